/* studio.js: the creator's live studio, /studio/{room}?token=... (see docs/pages.md). */
(function () {
  "use strict";
  var L = window.LiveGift;
  var el = L.el;
  var ctx = L.context();
  var $ = function (id) { return document.getElementById(id); };

  var tiers = L.parseTiers(ctx.params.get("tiers"));
  var endBtn = $("end-stream");
  var templateInput = $("shoutout-text");
  var welcomeSeq = null;
  var snapshotAsked = false;
  var sawLeaderboard = false;
  var sawViewers = false;
  var me = null;
  var titleFromServer = false;

  $("room-id").textContent = "Room " + ctx.room;

  // The connection state, errors, and the end of the stream (from any source).
  var status = new L.PageStatus({
    status: $("status"),
    message: $("message"),
    onEnded: function () {
      endBtn.disabled = true;
      endBtn.classList.remove("armed");
      endBtn.textContent = "Stream ended";
      Array.prototype.forEach.call(document.querySelectorAll(".shoutout-btn"), function (b) { b.disabled = true; });
      feed.notice("The stream has ended.", "ended");
    }
  });

  // ------------------------------------------------------------ totals

  var shown = { coins: null, diamonds: null, gifts: null, viewers: null };
  function setStat(name, value) {
    if (shown[name] === value) return;
    var node = $("total-" + name);
    node.textContent = L.fmt(value);
    if (shown[name] !== null) {
      node.classList.remove("bump");
      void node.offsetWidth;
      node.classList.add("bump");
    }
    shown[name] = value;
  }
  var totals = new L.Totals(function (t) {
    setStat("coins", t.coins);
    setStat("diamonds", t.diamonds);
    setStat("gifts", t.gifts);
  });
  setStat("coins", 0); setStat("diamonds", 0); setStat("gifts", 0); setStat("viewers", 0);

  // ------------------------------------------------------------ shout-outs

  function shoutoutText(user) {
    var template = (templateInput.value || "").trim() || "Thank you {name}!";
    var name = user.name || user.id;
    var text = template.split("{name}").join(name).trim();
    if (Array.from(text).length > 200) text = Array.from(text).slice(0, 199).join("") + "\u2026";
    return text;
  }

  function shoutoutButton(user, compact) {
    var name = user.name || user.id;
    var btn = el("button", { type: "button", class: "btn btn-small shoutout-btn" + (compact ? " btn-icon" : ""),
      testid: "shoutout-btn", title: "Shout out to " + name,
      "aria-label": "Shout out to " + name, dataset: { user: user.id || "" } });
    var label = compact ? "\u{1F4E3}" : "Shout-out";
    btn.textContent = label;
    if (status.ended) btn.disabled = true;
    btn.addEventListener("click", function () { sendShoutout(user, btn, label); });
    return btn;
  }

  function sendShoutout(user, btn, label) {
    if (!user || !user.id || status.ended) return;
    btn.disabled = true;
    btn.textContent = label === "Shout-out" ? "Sending\u2026" : "\u2026";
    client.request({ op: "shoutout", to: user.id, text: shoutoutText(user) }).then(function () {
      btn.textContent = label === "Shout-out" ? "Sent \u2713" : "\u2713";
      btn.classList.add("sent");
      setTimeout(function () {
        btn.textContent = label;
        btn.classList.remove("sent");
        btn.disabled = status.ended;
      }, 2500);
    }, function (err) {
      btn.textContent = label;
      btn.disabled = status.ended;
      status.error(err, "shoutout", 6000);
    });
  }

  // ------------------------------------------------------------ feed + top gifters

  var feed = new L.Feed($("feed"), {
    tiers: tiers,
    max: 300,
    decorate: function (row, ev, from) {
      if (from && from.id) row.appendChild(shoutoutButton(from));
    }
  });

  function renderTop(top) {
    var list = $("top-gifters");
    list.textContent = "";
    (top || []).slice(0, 10).forEach(function (entry, i) {
      var user = entry.user || {};
      list.appendChild(el("li", { class: "gifter", testid: "gifter", dataset: { user: user.id || "" } },
        el("span", { class: "rank", "aria-label": "Rank " + (i + 1), text: String(i + 1) }),
        L.avatar(user),
        el("span", { class: "name", text: user.name || user.id || "" }),
        el("span", { class: "coins", "aria-label": L.fmt(entry.coins) + " coins", text: L.fmt(entry.coins) }),
        shoutoutButton(user, true)));
    });
    $("top-empty").hidden = list.children.length > 0;
  }

  // ------------------------------------------------------------ stream state

  function loadSnapshot() {
    if (snapshotAsked) return;
    snapshotAsked = true;
    L.api("GET", "/api/streams/" + encodeURIComponent(ctx.room), undefined, ctx.token).then(function (s) {
      if (!s) return;
      totals.applySnapshot(s, welcomeSeq);
      if (!sawLeaderboard && Array.isArray(s.top_gifters)) renderTop(s.top_gifters);
      if (!sawViewers && typeof s.viewers === "number" && welcomeSeq === null) setStat("viewers", s.viewers);
      if (s.title) {
        titleFromServer = true;
        $("stream-title").textContent = s.title;
        document.title = s.title + " \u00B7 Studio \u00B7 livegift";
      }
      if (s.title && s.creator) $("room-id").textContent = (s.creator.name || s.creator.id) + " \u00B7 room " + ctx.room;
      if (s.live === false) status.end();
    }, function (err) {
      snapshotAsked = false;
      if (err.code === "not_found") status.error("not_found");
      else setTimeout(loadSnapshot, 2000);
    });
  }

  function onEvent(ev, meta) {
    meta = meta || {};
    switch (ev.type) {
      case "welcome":
        me = ev.you || null;
        if (welcomeSeq === null) welcomeSeq = typeof ev.seq === "number" ? ev.seq : 0;
        if (typeof ev.viewers === "number") setStat("viewers", ev.viewers);
        if (ev.creator && !titleFromServer) {
          $("stream-title").textContent = ev.creator.name || ev.creator.id;
          document.title = (ev.creator.name || ev.creator.id) + " \u00B7 Studio \u00B7 livegift";
        }
        if (me && ev.creator && me.id !== ev.creator.id) {
          status.say("You're signed in as " + (me.name || me.id) +
            ", not this stream's creator: shout-outs and ending the stream won't work.", "error");
        }
        loadSnapshot();
        break;
      case "gift":
        totals.addGift(ev);
        feed.gift(ev, meta);
        break;
      case "shoutout":
        feed.shoutout(ev, meta);
        break;
      case "leaderboard":
        sawLeaderboard = true;
        renderTop(ev.top);
        break;
      case "viewers":
        sawViewers = true;
        if (typeof ev.count === "number") setStat("viewers", ev.count);
        break;
      case "resumed":
        if (ev.complete === false && !meta.history) {
          feed.notice("Reconnected, but some gifts from the gap are too old to replay. Totals stay correct.", "warning");
          loadSnapshotAgain();
        }
        break;
      case "stream_ended":
        status.end();
        break;
    }
  }

  function loadSnapshotAgain() {
    // After an incomplete resume the running totals missed events: start again from the server.
    var t = new L.Totals(totals.onChange);
    totals = t;
    snapshotAsked = false;
    welcomeSeq = client.lastSeq;
    loadSnapshot();
  }

  var client = L.connect({
    room: ctx.room,
    token: ctx.token,
    history: true,
    onEvent: onEvent,
    onStatus: status.onStatus
  });
  window.studio = { client: client, feed: feed };

  // ------------------------------------------------------------ end stream (press twice)

  var armTimer = null;
  endBtn.addEventListener("click", function () {
    if (status.ended) return;
    if (!endBtn.classList.contains("armed")) {
      endBtn.classList.add("armed");
      endBtn.textContent = "Confirm: end stream";
      armTimer = setTimeout(function () {
        endBtn.classList.remove("armed");
        if (!status.ended) endBtn.textContent = "End stream";
      }, 5000);
      return;
    }
    clearTimeout(armTimer);
    endBtn.disabled = true;
    endBtn.textContent = "Ending\u2026";
    L.api("DELETE", "/api/streams/" + encodeURIComponent(ctx.room), undefined, ctx.token).then(function () {
      status.end();
    }, function (err) {
      endBtn.disabled = false;
      endBtn.classList.remove("armed");
      endBtn.textContent = "End stream";
      status.error(err, "end", 8000);
    });
  });

  // ------------------------------------------------------------ overlay URL (an overlay key, no token)

  var overlayBase = null;    // {url} from POST /api/overlay-key: /overlay/u/{user}?key=...
  var keyBtn = $("ov-key");

  function overlayUrl() {
    if (!overlayBase) return "";
    var url = new URL(overlayBase);
    var q = url.searchParams;
    var min = parseInt($("ov-min").value, 10);
    if (min > 0) q.set("min", String(min));
    var seconds = parseFloat($("ov-duration").value);
    if (seconds > 0 && Math.round(seconds * 1000) !== 4000) q.set("duration", String(Math.round(seconds * 1000)));
    var goal = parseInt($("ov-goal").value, 10);
    if (goal > 0) {
      q.set("goal", String(goal));
      var title = $("ov-goal-title").value.trim();
      if (title) q.set("goal_title", title);
    }
    if (ctx.params.get("tiers")) q.set("tiers", ctx.params.get("tiers"));
    return url.toString();
  }
  function refreshOverlayUrl() {
    $("ov-url").value = overlayUrl();
    $("ov-copy").disabled = !overlayBase;
  }
  keyBtn.addEventListener("click", function () {
    keyBtn.disabled = true;
    L.api("POST", "/api/overlay-key", undefined, ctx.token).then(function (res) {
      overlayBase = res.url;
      refreshOverlayUrl();
      keyBtn.textContent = "New overlay URL (revokes this one)";
      status.say("Overlay URL ready: paste it into an OBS Browser source.", "success", 5000);
    }, function (err) {
      status.error(err, undefined, 8000);
    }).then(function () { keyBtn.disabled = false; });
  });
  ["ov-min", "ov-duration", "ov-goal", "ov-goal-title"].forEach(function (id) {
    $(id).addEventListener("input", refreshOverlayUrl);
  });
  refreshOverlayUrl();
  $("ov-copy").addEventListener("click", function () {
    var input = $("ov-url");
    var done = function () {
      $("ov-copy").textContent = "Copied \u2713";
      setTimeout(function () { $("ov-copy").textContent = "Copy"; }, 2000);
    };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(input.value).then(done, function () { input.select(); });
    } else {
      input.select();
    }
  });
})();
