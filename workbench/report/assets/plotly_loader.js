// plotly.js for notebook outputs, from the installed `plotly` package (never a network): the text of
// plotly.min.js takes the place of the marker below (workbench/report/scripts.py). A page runs it once: a second
// copy (a re-run cell, a duplicated output) finds window.Plotly and skips it. Then the widgets' script, if it
// is already there, draws the figures that were waiting for plotly.js.
if (typeof window.Plotly === "undefined") {
/* @plotly.min.js@ */
}
if (window.wbWidgets) window.wbWidgets.scan();
