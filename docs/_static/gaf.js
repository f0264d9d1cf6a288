// A click on a figure opens it full size (the 4-panel results figures are
// unreadable at the width of the text column).
document.addEventListener("DOMContentLoaded", () => {
  for (const img of document.querySelectorAll(".bd-article img")) {
    if (img.closest("a")) continue;
    const link = document.createElement("a");
    link.href = img.src;
    link.title = "Open the full-size image";
    img.classList.add("gaf-zoom");
    img.replaceWith(link);
    link.appendChild(img);
  }
});
