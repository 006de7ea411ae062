/*
 * overlay.js: the OBS browser-source overlay (see docs/pages.md), either
 *   /overlay/u/{user}?key=...   the creator's stable URL: follows each new stream, holds no
 *                               user token (the key comes from POST /api/overlay-key), or
 *   /overlay/{room}?token=...   one room, with a user's token.
 *
 * Query parameters:
 *   duration=ms   how long one alert shows (default 4000)
 *   gap=ms        pause between two alerts (default 500)
 *   min=N         hide gifts whose event "coins" is below N (default 0: show all)
 *   tiers=a,b,c   value tiers in coins (default 100,1000,10000 -> tiers 1..4)
 *   goal=N        show a goal bar toward N coins; goal_title=... its title
 *   goal_since=now  count the goal from when the overlay loaded (default: the whole stream)
 *   debug=1       show the connection state
 */
(function () {
  "use strict";
  var L = window.LiveGift;
  var el = L.el;
  var ctx = L.context();
  var p = ctx.params;
  var $ = function (id) { return document.getElementById(id); };

  var DURATION = L.clampInt(p.get("duration"), 4000, 500, 120000);
  var GAP = L.clampInt(p.get("gap"), 500, 0, 60000);
  var MIN = L.clampInt(p.get("min"), 0, 0);
  var TIERS = L.parseTiers(p.get("tiers"));
  var GOAL = L.clampInt(p.get("goal"), 0, 0);
  var GOAL_FROM_NOW = p.get("goal_since") === "now";
  var MAX_SHOW = Math.max(DURATION * 4, 15000);   // a long streak extends its alert up to this
  var MAX_QUEUE = 100;
  if (p.get("debug") === "1") document.body.classList.add("debug");

  // Shown only with ?debug=1, except a failed state (an expired token...), which the CSS
  // always shows. The overlay has no message region.
  var status = new L.PageStatus({ status: $("status") });
  var alertsNode = $("alerts");

  // ------------------------------------------------------------ alert queue

  var queue = [];        // items waiting to show
  var current = null;    // {item, node, start, timer}
  var gapTimer = null;

  function newItem(ev) {
    var gift = ev.gift || {};
    var count = Number(ev.count) || 1;
    return {
      key: L.streakKey(ev),
      from: ev.from || {},
      gift: gift,
      combo: Number(ev.combo) || count,
      giftCoins: Number(gift.coins) || 0,
      coins: Number(ev.coins) || 0,      // coins of the events merged into this alert
      ts: ev.ts,
      seq: ev.seq
    };
  }

  function streakCoins(item) {
    return item.giftCoins ? item.giftCoins * item.combo : item.coins;
  }

  function render(item) {
    var tier = L.tierOf(streakCoins(item), TIERS);
    item.countNode = el("span", { class: "alert-count", testid: "alert-count", text: "x" + item.combo });
    item.coinsNode = el("div", { class: "alert-coins", text: L.fmt(streakCoins(item)) + " coins" });
    var node = el("div", { class: "alert tier-" + tier, testid: "alert", role: "status",
      dataset: { state: "showing", key: item.key, tier: tier, gift: item.gift.id || "", from: item.from.id || "" } },
      el("div", { class: "alert-icon", "aria-hidden": "true", text: L.giftIcon(item.gift.id) }),
      el("div", { class: "alert-text" },
        el("div", { class: "alert-name", testid: "alert-name", text: item.from.name || item.from.id || "Someone" }),
        el("div", { class: "alert-line" },
          el("span", { text: "sent " }),
          el("span", { class: "gift-name", text: item.gift.name || item.gift.id || "a gift" })),
        item.coinsNode),
      item.countNode);
    item.tier = tier;
    return node;
  }

  function updateShown(item, prevCombo) {
    L.countUp(item.countNode, prevCombo, item.combo, "x");
    item.coinsNode.textContent = L.fmt(streakCoins(item)) + " coins";
    var tier = L.tierOf(streakCoins(item), TIERS);
    if (tier > item.tier && current && current.item === item) {
      current.node.classList.remove("tier-" + item.tier);
      current.node.classList.add("tier-" + tier);
      current.node.dataset.tier = tier;
      item.tier = tier;
    }
  }

  function displayTime() {
    // A long backlog shows each alert for less time so the overlay catches up.
    return queue.length >= 5 ? Math.max(1500, Math.round(DURATION / 2)) : DURATION;
  }

  function pump() {
    if (current || gapTimer || !queue.length) return;
    var item = queue.shift();
    var node = render(item);
    alertsNode.appendChild(node);
    var time = displayTime();
    current = { item: item, node: node, start: Date.now(), end: Date.now() + time, timer: null };
    current.timer = setTimeout(hide, time);
  }

  function extend() {
    // The streak goes on: keep the alert up for another full duration (within MAX_SHOW).
    var now = Date.now();
    var end = Math.min(now + DURATION, current.start + MAX_SHOW);
    if (end <= current.end) return;
    clearTimeout(current.timer);
    current.end = end;
    current.timer = setTimeout(hide, end - now);
  }

  function hide() {
    if (!current) return;
    var node = current.node;
    current = null;
    node.dataset.state = "leaving";
    node.setAttribute("aria-hidden", "true");
    setTimeout(function () { if (node.parentNode) node.parentNode.removeChild(node); }, 320);
    gapTimer = setTimeout(function () { gapTimer = null; pump(); }, Math.max(GAP, 0));
  }

  function onGift(ev) {
    addToGoal(ev);
    if ((Number(ev.coins) || 0) < MIN) return;
    var key = L.streakKey(ev);
    var prev;
    // Same streak already showing or waiting: count up in that alert.
    if (current && current.item.key === key && L.continuesStreak(current.item, ev)) {
      prev = current.item.combo;
      merge(current.item, ev);
      updateShown(current.item, prev);
      extend();
      return;
    }
    for (var i = queue.length - 1; i >= 0; i--) {
      if (queue[i].key === key && L.continuesStreak(queue[i], ev)) {
        merge(queue[i], ev);
        return;
      }
    }
    if (queue.length >= MAX_QUEUE) dropOne();
    queue.push(newItem(ev));
    pump();
  }

  function merge(item, ev) {
    item.combo = Number(ev.combo) || item.combo;
    item.coins += Number(ev.coins) || 0;
    item.ts = ev.ts;
    item.seq = ev.seq;
  }

  function dropOne() {
    // Full queue: drop the oldest of the cheapest alerts so big gifts always get shown.
    var worst = 0;
    for (var i = 1; i < queue.length; i++) {
      if (streakCoins(queue[i]) < streakCoins(queue[worst])) worst = i;
    }
    queue.splice(worst, 1);
  }

  // ------------------------------------------------------------ goal bar

  var goal = null;
  var room = ctx.creator ? "" : ctx.room;   // following a creator: the room of each welcome
  if (GOAL > 0) {
    goal = new L.Totals(renderGoal);
    var goalNode = $("goal");
    goalNode.hidden = false;
    goalNode.setAttribute("aria-valuemax", String(GOAL));
    $("goal-title").textContent = (p.get("goal_title") || "").trim() || "Coin goal";
    renderGoal(goal);
  }
  var welcomeSeq = null;
  var snapshotAsked = false;

  function addToGoal(ev) { if (goal) goal.addGift(ev); }

  function renderGoal(t) {
    var value = t.coins;
    var pct = Math.max(0, Math.min(100, (value / GOAL) * 100));
    var node = $("goal");
    node.setAttribute("aria-valuenow", String(Math.min(value, GOAL)));
    node.setAttribute("aria-valuetext", L.fmt(value) + " of " + L.fmt(GOAL) + " coins");
    node.dataset.value = value;
    node.classList.toggle("done", value >= GOAL);
    $("goal-fill").style.width = pct + "%";
    $("goal-numbers").textContent = L.fmt(value) + " / " + L.fmt(GOAL);
  }

  function loadGoalSnapshot() {
    if (!goal || snapshotAsked) return;
    snapshotAsked = true;
    if (GOAL_FROM_NOW) {
      goal.applySnapshot({ coins_received: 0, seq: welcomeSeq }, welcomeSeq);
      return;
    }
    var forRoom = room, forGoal = goal;
    L.api("GET", "/api/streams/" + encodeURIComponent(forRoom), undefined, ctx.token || undefined).then(function (s) {
      if (forGoal === goal) goal.applySnapshot(s || {}, welcomeSeq);
    }, function () {
      if (forGoal !== goal) return;
      snapshotAsked = false;
      setTimeout(loadGoalSnapshot, 3000);
    });
  }

  /** A new stream of the followed creator: its goal counts from that stream's start. */
  function newRoom(id) {
    room = id;
    welcomeSeq = null;
    if (goal) {
      goal = new L.Totals(renderGoal);
      snapshotAsked = false;
      renderGoal(goal);
    }
  }

  // ------------------------------------------------------------ connection

  var client = L.connect({
    room: ctx.room,
    token: ctx.token,
    creator: ctx.creator,
    key: ctx.key,
    onEvent: function (ev) {
      if (ev.type === "welcome") {
        if (ctx.creator && ev.room !== room) newRoom(ev.room);
        if (welcomeSeq === null) welcomeSeq = typeof ev.seq === "number" ? ev.seq : 0;
        loadGoalSnapshot();
      } else if (ev.type === "gift") {
        onGift(ev);
      }
    },
    onStatus: status.onStatus
  });
  window.overlay = {
    client: client,
    queueLength: function () { return queue.length; },
    showing: function () { return current ? current.item : null; }
  };
})();
