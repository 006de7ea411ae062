/*
 * ui.js: the DOM widgets shared by the studio, overlay and watch pages, drawn on top of the
 * protocol client in client.js (load client.js first). Adds to window.LiveGift:
 *
 *  - el(): an element builder that never parses user data as HTML;
 *  - formatting: fmt, clampInt, parseTiers, tierOf, giftIcon, initial, hueOf, avatar;
 *  - PageStatus: the one way a page shows its connection state and its errors;
 *  - Feed: the live gift feed (a streak is one row counting up in place), countUp.
 *
 * No dependencies, no build step.
 */
(function (global) {
  "use strict";

  var L = global.LiveGift;
  if (!L || !L.connect) throw new Error("ui.js needs client.js: load it first");
  var continuesStreak = L.continuesStreak;
  var streakKey = L.streakKey;

  // ---------------------------------------------------------------- elements and formats

  /**
   * Build an element. Strings and numbers among the children become text nodes, so user
   * data is never parsed as HTML. attrs: {class, text, testid, dataset:{}, on:{event:fn},
   * vars:{"--css-var": value} (set through CSSOM, so a strict CSP allows it), hidden,
   * disabled, ...any other attribute}.
   */
  function el(tag, attrs) {
    var node = document.createElement(tag);
    attrs = attrs || {};
    Object.keys(attrs).forEach(function (key) {
      var value = attrs[key];
      if (value === undefined || value === null || value === false) return;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "testid") node.setAttribute("data-testid", value);
      else if (key === "dataset") Object.keys(value).forEach(function (k) { node.dataset[k] = value[k]; });
      else if (key === "on") Object.keys(value).forEach(function (k) { node.addEventListener(k, value[k]); });
      else if (key === "vars") Object.keys(value).forEach(function (k) { node.style.setProperty(k, String(value[k])); });
      else if (value === true) node.setAttribute(key, "");
      else node.setAttribute(key, String(value));
    });
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function append(node, child) {
    if (child === undefined || child === null || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    if (typeof child === "string" || typeof child === "number") {
      node.appendChild(document.createTextNode(String(child)));
    } else {
      node.appendChild(child);
    }
  }

  var numberFormat = new Intl.NumberFormat("en-US");
  function fmt(n) { return numberFormat.format(Number(n) || 0); }

  function clampInt(value, fallback, min, max) {
    var n = parseInt(value, 10);
    if (!isFinite(n)) return fallback;
    if (min !== undefined && n < min) n = min;
    if (max !== undefined && n > max) n = max;
    return n;
  }

  /** Value tier (1-based) of an amount of coins for thresholds like [100, 1000, 10000]. */
  function tierOf(coins, thresholds) {
    var tier = 1;
    for (var i = 0; i < thresholds.length; i++) if (coins >= thresholds[i]) tier = i + 2;
    return tier;
  }

  /** Parse "?tiers=100,1000,10000" into sorted positive integers (the default when bad). */
  function parseTiers(raw) {
    var fallback = [100, 1000, 10000];
    if (!raw) return fallback;
    var list = String(raw).split(",").map(function (s) { return parseInt(s.trim(), 10); })
      .filter(function (n) { return isFinite(n) && n > 0; });
    list.sort(function (a, b) { return a - b; });
    return list.length ? list.slice(0, 6) : fallback;
  }

  var GIFT_ICONS = {
    rose: "\u{1F339}", finger_heart: "\u{1FAF0}", ice_cream: "\u{1F366}", donut: "\u{1F369}",
    perfume: "\u{1F9F4}", hand_hearts: "\u{1FAF6}", corgi: "\u{1F436}", galaxy: "\u{1F30C}",
    sports_car: "\u{1F3CE}\uFE0F", lion: "\u{1F981}", universe: "\u{1FA90}"
  };
  function giftIcon(id) { return GIFT_ICONS[id] || "\u{1F381}"; }

  /** First letter of a display name, for avatars. */
  function initial(name) {
    var s = String(name || "?").trim();
    return s ? Array.from(s)[0].toUpperCase() : "?";
  }

  /** A stable hue (0-359) for a user id, so a gifter keeps the same avatar colour. */
  function hueOf(id) {
    var h = 0, s = String(id || "");
    for (var i = 0; i < s.length; i++) h = (h * 31 + s.charCodeAt(i)) % 360;
    return h;
  }

  // ---------------------------------------------------------------- connection status and messages

  var STATUS_TEXT = {
    idle: "Starting", connecting: "Connecting", live: "Live", reconnecting: "Reconnecting",
    ended: "Stream ended", unauthorized: "Link expired", forbidden: "Not allowed",
    not_found: "Stream not found", closed: "Disconnected", offline: "Offline",
    token_expired: "Session ended"
  };

  /** Render a connection state into a status element (data-state + readable text). */
  function showStatus(node, state, detail) {
    if (!node) return;
    node.dataset.state = state;
    var text = STATUS_TEXT[state] || state;
    if (state === "reconnecting" && detail && detail.delay) {
      text += " in " + Math.max(1, Math.round(detail.delay / 1000)) + "s";
    }
    node.textContent = text;
    node.setAttribute("title", "Connection: " + text);
  }

  /** Show a message in an aria-live region; kind: "info" | "success" | "error". */
  function showMessage(node, text, kind, ttlMs) {
    if (!node) return;
    clearTimeout(node._lgTimer);
    node.textContent = text || "";
    node.dataset.kind = kind || "info";
    node.hidden = !text;
    if (text && ttlMs) {
      node._lgTimer = setTimeout(function () { node.hidden = true; node.textContent = ""; }, ttlMs);
    }
  }

  // States after which the connection stays down for good until the page is opened again
  // with a fresh link: the page says why in its message region.
  var FAILED = { unauthorized: true, token_expired: true, forbidden: true, not_found: true };

  /**
   * PageStatus: the one way a page shows its connection state and its errors.
   *
   *   var status = new LiveGift.PageStatus({
   *     status: node,                 // the status pill: data-state + readable text
   *     message: node,                // the aria-live message region (optional)
   *     endOn: ["not_found"],         // states that end the page besides "ended" (optional)
   *     onEnded: function (reason) {},        // once, when the page ends ("ended" or an endOn state)
   *     onState: function (state, detail) {}  // after each state is shown, for page extras
   *   });
   *   LiveGift.connect({..., onStatus: status.onStatus});
   *
   * Each connection state shows in the pill ("Reconnecting in 3s"). unauthorized,
   * token_expired, forbidden and not_found also put their error text in the message region
   * (token_expired: "Your session ended — reload with a new link."). The page ends on the
   * "ended" state, on an endOn state, or when it calls status.end() itself (a stream_ended
   * event, a snapshot with live: false); after that only "ended" is shown, so the pill keeps
   * saying why. status.ended tells whether it has. status.say() and status.error() put any
   * other message in the same region.
   */
  function PageStatus(opts) {
    var self = this;
    opts = opts || {};
    this.node = opts.status || null;
    this.message = opts.message || null;
    this.endOn = {};
    (opts.endOn || []).forEach(function (state) { self.endOn[state] = true; });
    this.onEnded = opts.onEnded || function () {};
    this.onState = opts.onState || function () {};
    this.ended = false;
    this.onStatus = function (state, detail) { self.update(state, detail); };
  }

  /** Show a connection state (the onStatus of LiveGift.connect). */
  PageStatus.prototype.update = function (state, detail) {
    if (this.ended && state !== "ended") return;
    showStatus(this.node, state, detail);
    if (FAILED[state]) this.error(state);
    if (state === "ended" || this.endOn[state]) this.end(state);
    this.onState(state, detail);
  };

  /** The page has ended (reason "ended" by default, which the pill then shows). Once. */
  PageStatus.prototype.end = function (reason) {
    if (this.ended) return false;
    reason = reason || "ended";
    this.ended = true;
    if (reason === "ended") showStatus(this.node, "ended");
    this.onEnded(reason);
    return true;
  };

  /** Show a message; kind: "info" | "success" | "error"; "" hides the region. */
  PageStatus.prototype.say = function (text, kind, ttlMs) {
    showMessage(this.message, text, kind, ttlMs);
  };

  /** Show the clear text for an error (an ApiError or a bare code), optionally for a context. */
  PageStatus.prototype.error = function (err, where, ttlMs) {
    var code = typeof err === "string" ? err : (err && err.code);
    var fallback = typeof err === "string" ? undefined : (err && err.message);
    this.say(L.errorText(code, fallback, where), "error", ttlMs);
  };

  // ---------------------------------------------------------------- gift feed

  /** Show a number counting up from `from` to `to` in place (at most ~400 ms). */
  function countUp(node, from, to, prefix) {
    prefix = prefix || "";
    clearInterval(node._lgCount);
    var steps = Math.max(1, to - from);
    var stepMs = Math.max(16, Math.min(80, Math.floor(400 / steps)));
    var jump = Math.max(1, Math.ceil(steps / (400 / stepMs)));
    var value = from;
    node.classList.remove("bump");
    void node.offsetWidth;                        // restart the bump animation
    node.classList.add("bump");
    if (to <= from || (global.matchMedia && global.matchMedia("(prefers-reduced-motion: reduce)").matches)) {
      node.textContent = prefix + to;
      return;
    }
    node._lgCount = setInterval(function () {
      value = Math.min(to, value + jump);
      node.textContent = prefix + value;
      if (value >= to) clearInterval(node._lgCount);
    }, stepMs);
  }

  /**
   * A live feed in a list element, newest first. A streak (same sender and gift, combo
   * rising) is one row whose xN counter counts up in place.
   * opts: {tiers, max, me (user id), decorate(row, ev, user)}
   */
  function Feed(list, opts) {
    this.list = list;
    this.opts = opts || {};
    this.tiers = this.opts.tiers || [100, 1000, 10000];
    this.max = this.opts.max || 200;
    this.streaks = new Map();   // key -> {row, combo, ts, giftCoins}
    this.me = this.opts.me || null;
  }

  Feed.prototype._add = function (row) {
    this.list.insertBefore(row, this.list.firstChild);
    while (this.list.children.length > this.max) {
      var last = this.list.lastElementChild;
      if (last._lgKey && this.streaks.get(last._lgKey) && this.streaks.get(last._lgKey).row === last) {
        this.streaks.delete(last._lgKey);
      }
      this.list.removeChild(last);
    }
    if (this.opts.onChange) this.opts.onChange();
  };

  Feed.prototype.gift = function (ev, meta) {
    var key = streakKey(ev);
    var prev = this.streaks.get(key);
    var gift = ev.gift || {};
    var from = ev.from || {};
    var count = Number(ev.count) || 1;
    var combo = Number(ev.combo) || count;
    var giftCoins = Number(gift.coins) || 0;
    var streakCoins = giftCoins ? giftCoins * combo : Number(ev.coins) || 0;
    var tier = tierOf(streakCoins, this.tiers);
    if (continuesStreak(prev, ev) && prev.row.isConnected) {
      var row = prev.row;
      countUp(prev.comboNode, prev.combo, combo, "x");
      prev.combo = combo;
      prev.ts = ev.ts;
      prev.coinsNode.textContent = fmt(streakCoins) + " coins";
      row.dataset.seq = ev.seq;
      row.dataset.combo = combo;
      this._setTier(row, tier);
      row.classList.remove("pulse");
      void row.offsetWidth;
      row.classList.add("pulse");
      return row;
    }
    var comboNode = el("span", { class: "combo", testid: "combo", text: "x" + combo });
    var coinsNode = el("span", { class: "coins", text: fmt(streakCoins) + " coins" });
    var row2 = el("li", { class: "feed-item gift-item", testid: "feed-item",
      dataset: { type: "gift", seq: ev.seq, key: key, combo: combo, gift: gift.id || "", from: from.id || "" } },
      avatar(from),
      el("div", { class: "item-body" },
        el("div", { class: "item-line" },
          el("strong", { class: "name", text: from.name || from.id || "Someone" }),
          el("span", { class: "verb", text: " sent " }),
          el("span", { class: "gift-name", text: gift.name || gift.id || "a gift" })),
        el("div", { class: "item-meta" }, coinsNode,
          el("time", { class: "time", text: timeOf(ev.ts) }))),
      el("span", { class: "gift-icon", "aria-hidden": "true", text: giftIcon(gift.id) }),
      comboNode);
    this._setTier(row2, tier);
    if (meta && meta.history) row2.classList.add("history");
    row2._lgKey = key;
    if (this.opts.decorate) this.opts.decorate(row2, ev, from);
    this.streaks.set(key, { row: row2, combo: combo, ts: ev.ts, comboNode: comboNode, coinsNode: coinsNode });
    this._add(row2);
    return row2;
  };

  Feed.prototype._setTier = function (row, tier) {
    var old = row.dataset.tier;
    if (old && Number(old) >= tier) return;
    if (old) row.classList.remove("tier-" + old);
    row.classList.add("tier-" + tier);
    row.dataset.tier = tier;
  };

  Feed.prototype.shoutout = function (ev, meta) {
    var to = ev.to || {};
    var mine = this.me !== null && to.id === this.me;
    var row = el("li", { class: "feed-item shoutout-item" + (mine ? " shoutout-me" : "") + (ev.auto ? " shoutout-auto" : ""),
      testid: "feed-item", dataset: { type: "shoutout", seq: ev.seq, to: to.id || "", mine: mine ? "true" : "false" } },
      el("span", { class: "avatar avatar-shoutout", "aria-hidden": "true", text: "\u{1F4E3}" }),
      el("div", { class: "item-body" },
        el("div", { class: "item-line" },
          el("span", { class: "label", text: mine ? "Shout-out to you" : "Shout-out to " }),
          mine ? null : el("strong", { class: "name", text: to.name || to.id || "" }),
          ev.auto ? el("span", { class: "badge", text: "auto" }) : null),
        el("div", { class: "shoutout-text", testid: "shoutout-text", text: ev.text || "" })));
    if (meta && meta.history) row.classList.add("history");
    this._add(row);
    return row;
  };

  Feed.prototype.notice = function (text, kind) {
    var row = el("li", { class: "feed-item notice-item notice-" + (kind || "info"), testid: "feed-item",
      dataset: { type: kind || "notice" } }, el("span", { class: "notice-text", text: text }));
    this._add(row);
    return row;
  };

  function avatar(user) {
    user = user || {};
    return el("span", { class: "avatar", "aria-hidden": "true",
      vars: { "--hue": hueOf(user.id) } }, initial(user.name || user.id));
  }

  function timeOf(ts) {
    var d = typeof ts === "number" ? new Date(ts) : new Date();
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  var exports = {
    el: el,
    fmt: fmt,
    clampInt: clampInt,
    tierOf: tierOf,
    parseTiers: parseTiers,
    giftIcon: giftIcon,
    initial: initial,
    hueOf: hueOf,
    showStatus: showStatus,
    showMessage: showMessage,
    PageStatus: PageStatus,
    Feed: Feed,
    avatar: avatar,
    countUp: countUp
  };
  Object.keys(exports).forEach(function (name) { L[name] = exports[name]; });
})(window);
