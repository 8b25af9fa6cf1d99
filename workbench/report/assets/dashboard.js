// The dashboard index: sort the table by a column (click its header; click again to reverse).
function sortBy(c) {
  const t = document.getElementById('f');
  const r = [...t.rows].slice(1);
  const d = t.dataset.dir == c ? -1 : 1;
  t.dataset.dir = d == 1 ? c : '';
  r.sort((a, b) => {
    const x = a.cells[c].innerText, y = b.cells[c].innerText;
    const nx = parseFloat(x), ny = parseFloat(y);
    return (isNaN(nx) ? x.localeCompare(y) : nx - ny) * d;
  });
  r.forEach(e => t.tBodies[0].appendChild(e));
}
