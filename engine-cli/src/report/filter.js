// The filter and the search: hide cards that do not match. Everything shows without this script.
(function () {
  var failedOnly = document.getElementById("failed-only");
  var search = document.getElementById("search");
  var shown = document.getElementById("shown");
  var cards = document.querySelectorAll(".card");
  function apply() {
    var words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    var n = 0;
    for (var i = 0; i < cards.length; i++) {
      var card = cards[i];
      var text = card.textContent.toLowerCase();
      var keep = (!failedOnly.checked || card.classList.contains("failed")) &&
        words.every(function (w) { return text.indexOf(w) >= 0; });
      card.hidden = !keep;
      if (keep) n++;
    }
    shown.textContent = n + " of " + cards.length + " shown";
  }
  // A link can carry the view: report.html#failed, report.html#q=rooftop, or both (#failed&q=...).
  // A part that is not valid percent-encoding (#q=100%) is taken as written.
  function decoded(part) {
    try { return decodeURIComponent(part); } catch (e) { return part; }
  }
  var hash = location.hash.slice(1).split("&");
  for (var j = 0; j < hash.length; j++) {
    var part = decoded(hash[j]);
    if (part === "failed") failedOnly.checked = true;
    if (hash[j].indexOf("q=") === 0) search.value = decoded(hash[j].slice(2));
  }
  failedOnly.addEventListener("change", apply);
  search.addEventListener("input", apply);
  document.getElementById("tools").hidden = false;
  apply();
})();
