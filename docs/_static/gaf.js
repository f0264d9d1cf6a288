// A click on a figure opens it full size (the 4-panel results figures are
// unreadable at the width of the text column).
function zoomableFigures() {
  for (const img of document.querySelectorAll(".bd-article img")) {
    if (img.closest("a")) continue;
    const link = document.createElement("a");
    link.href = img.src;
    link.title = "Open the full-size image";
    img.classList.add("gaf-zoom");
    img.replaceWith(link);
    link.appendChild(img);
  }
}

// Short table cells (numbers such as "97.3 ± 0.1") do not wrap; the table
// scrolls instead. Long prose cells still wrap.
function unbrokenShortCells() {
  for (const cell of document.querySelectorAll(".bd-article td, .bd-article th")) {
    if (cell.textContent.trim().length <= 24) cell.classList.add("gaf-nowrap");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  zoomableFigures();
  unbrokenShortCells();
});
