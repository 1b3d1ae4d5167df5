(function () {
  "use strict";
  var thumbs = JSON.parse(document.getElementById("thumbs").textContent);
  var tip = document.getElementById("tip"), tipImg = document.getElementById("tip-img");
  var tipText = document.getElementById("tip-text");
  function isPoint(t) { return t.classList && t.classList.contains("pt"); }
  function show(ev) {
    if (!isPoint(ev.target)) return;
    var info = thumbs[ev.target.getAttribute("data-row")];
    if (!info) return;
    tipImg.src = info[0];
    tipText.textContent = info[2] ? info[1] + " (" + info[2] + ")" : info[1];
    tip.style.left = (ev.pageX + 14) + "px";
    tip.style.top = (ev.pageY + 14) + "px";
    tip.hidden = false;
  }
  function hide(ev) { if (isPoint(ev.target)) tip.hidden = true; }
  document.querySelectorAll("svg.map").forEach(function (svg) {
    svg.addEventListener("mouseover", show);
    svg.addEventListener("mouseout", hide);
  });
  var selfcheck = location.hash === "#selfcheck";
  if (selfcheck) {
    var box = document.createElement("div");
    box.hidden = true;
    Object.keys(thumbs).forEach(function (key) {
      var im = new Image();
      im.className = "selfcheck";
      im.src = thumbs[key][0];
      box.appendChild(im);
    });
    document.body.appendChild(box);
  }
  function count(images) {
    var ok = 0;
    images.forEach(function (im) { if (im.complete && im.naturalWidth > 0) ok++; });
    return [ok, images.length - ok];
  }
  window.addEventListener("load", function () {
    var b = document.body.dataset;
    var page = count(Array.prototype.filter.call(document.querySelectorAll("img[src]"), function (im) {
      return im !== tipImg && !im.classList.contains("selfcheck");
    }));
    b.imagesOk = page[0];
    b.imagesBroken = page[1];
    if (selfcheck) {
      var hover = count(Array.prototype.slice.call(document.querySelectorAll("img.selfcheck")));
      b.thumbsOk = hover[0];
      b.thumbsBroken = hover[1];
    }
    b.mapPoints = document.querySelectorAll("svg.map circle.pt").length;
    var first = document.querySelector("svg.map circle.pt");
    if (first) {
      first.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
      var shown = !tip.hidden && tipImg.src.indexOf("data:image/jpeg;base64,") === 0;
      first.dispatchEvent(new MouseEvent("mouseout", {bubbles: true}));
      b.hover = shown && tip.hidden ? "ok" : "failed";
    } else {
      b.hover = "none";
    }
    b.ready = "1";
  });
})();
