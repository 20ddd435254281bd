// MathJax 3 set-up for pymdownx.arithmatex in generic mode (Material for MkDocs, "Math" page):
// arithmatex wraps every formula in an element of class "arithmatex" with \( \) or \[ \]
// delimiters, and MathJax typesets only those elements. MathJax itself is the vendored
// javascripts/mathjax/tex-svg.js (npm package mathjax 3.2.2, Apache-2.0): SVG output embeds its
// glyphs, so the site renders without any network access.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  svg: {
    fontCache: "global",
  },
};

// Typeset again after Material's instant navigation swaps the page content. On the first load
// MathJax typesets the page by itself once its start-up is done.
document$.subscribe(() => {
  if (!window.MathJax.startup || !window.MathJax.startup.output) {
    return;
  }
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
