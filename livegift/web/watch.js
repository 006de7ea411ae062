/* watch.js: the viewer page, /watch/{room}?token=... (see docs/pages.md). */
(function () {
  "use strict";
  var L = window.LiveGift;
  var el = L.el;
  var ctx = L.context();
  var $ = function (id) { return document.getElementById(id); };

  var region = (ctx.params.get("region") || "US").toUpperCase();
  var tiers = L.parseTiers(ctx.params.get("tiers"));
  var messageNode = $("message");
  var balanceNode = $("balance");
  var rechargeBtn = $("recharge");
  var packageSelect = $("package");
  var comboBox = $("combo-box");
  var comboNode = $("combo");
  var balance = null;
  var gifts = [];
  var me = null;

  $("room-id").textContent = "Room " + ctx.room;

  // The connection state, errors and messages, and the end of the stream (from any source).
  // A room that doesn't exist ends the page too, but the status and message say why.
  var status = new L.PageStatus({
    status: $("status"),
    message: messageNode,
    endOn: ["not_found"],
    onEnded: function (reason) {
      Array.prototype.forEach.call(document.querySelectorAll(".gift-btn"), function (b) { b.disabled = true; });
      if (reason === "ended") feed.notice("The stream has ended. Thanks for watching!", "ended");
    },
    onState: function (state) {
      if (state === "live") loadWallet();       // balance may have changed while away
    }
  });

  // ------------------------------------------------------------ balance

  function setBalance(coins) {
    if (typeof coins !== "number") return;
    var prev = balance;
    balance = coins;
    balanceNode.textContent = L.fmt(coins);
    balanceNode.dataset.value = String(coins);
    if (prev !== null && prev !== coins) {
      balanceNode.classList.remove("bump");
      void balanceNode.offsetWidth;
      balanceNode.classList.add("bump");
    }
    gifts.forEach(function (g) {
      var btn = $("gift-" + g.id);
      if (btn) btn.classList.toggle("unaffordable", coins < g.coins);
    });
  }

  var balanceEpoch = 0;    // bumped by every ack/recharge, so a slower GET can't show an old balance
  function loadWallet() {
    var epoch = balanceEpoch;
    return L.api("GET", "/api/wallet", undefined, ctx.token).then(function (w) {
      if (epoch === balanceEpoch) setBalance(w.coins);
    }, function (err) {
      status.error(err);
    });
  }

  // ------------------------------------------------------------ recharge (development receipts)

  function formatPrice(minor, currency) {
    try {
      var f = new Intl.NumberFormat(undefined, { style: "currency", currency: currency });
      var digits = f.resolvedOptions().maximumFractionDigits;
      return f.format(minor / Math.pow(10, digits));
    } catch (e) {
      return minor + " " + currency;
    }
  }

  function loadPackages() {
    L.api("GET", "/api/coins/packages?region=" + encodeURIComponent(region)).then(function (data) {
      packageSelect.textContent = "";
      (data.packages || []).forEach(function (pkg, i) {
        packageSelect.appendChild(el("option", { value: pkg.id, selected: i === 2 || undefined },
          L.fmt(pkg.coins) + " coins \u00B7 " + formatPrice(pkg.price, data.currency)));
      });
      if (!packageSelect.value && packageSelect.options.length) packageSelect.selectedIndex = 0;
    }, function (err) {
      status.error(err, "recharge");
    });
  }

  rechargeBtn.addEventListener("click", function () {
    var pkg = packageSelect.value;
    if (!pkg) return;
    rechargeBtn.disabled = true;
    rechargeBtn.textContent = "Recharging\u2026";
    L.api("POST", "/api/dev/receipt", { package: pkg, region: region }, ctx.token).catch(function (err) {
      if (err.status === 404 && err.code === "not_found") err = new L.ApiError("dev_receipts_disabled", "", 404);
      throw err;
    }).then(function (r) {
      return L.api("POST", "/api/wallet/recharge", { receipt: r.receipt }, ctx.token);
    }).then(function (res) {
      if (res.balance) { balanceEpoch++; setBalance(res.balance.coins); }
      var added = res.transaction ? res.transaction.coins : null;
      status.say(added ? "Added " + L.fmt(added) + " coins to your balance." : "Recharge complete.", "success", 5000);
    }, function (err) {
      status.error(err, "recharge");
    }).then(function () {
      rechargeBtn.disabled = false;
      rechargeBtn.textContent = "Recharge";
    });
  });

  // ------------------------------------------------------------ gift picker

  var comboTimer = null;
  var comboState = { gift: null, combo: 0 };

  function showCombo(gift, combo) {
    if (typeof combo !== "number") return;
    var prev = comboState.gift === gift.id ? comboState.combo : 0;
    if (comboState.gift === gift.id && combo < prev && combo > 1) return;   // a late ack
    comboState = { gift: gift.id, combo: combo };
    $("combo-gift").textContent = L.giftIcon(gift.id) + " " + gift.name + " ";
    comboBox.hidden = false;
    comboBox.dataset.gift = gift.id;
    comboNode.dataset.value = String(combo);
    if (combo > prev && prev > 0) L.countUp(comboNode, prev, combo, "x");
    else comboNode.textContent = "x" + combo;
    clearTimeout(comboTimer);
    comboTimer = setTimeout(function () { comboBox.hidden = true; comboState = { gift: null, combo: 0 }; }, 6000);
  }

  function sendGift(gift, btn) {
    if (status.ended) { status.error("stream_not_live"); return; }
    var count = parseInt($("quantity").value, 10) || 1;
    btn.classList.remove("tapped");
    void btn.offsetWidth;
    btn.classList.add("tapped");
    setTimeout(function () { btn.classList.remove("tapped"); }, 160);
    client.request({ op: "gift", req: L.newReq(), gift: gift.id, count: count }).then(function (ack) {
      if (typeof ack.balance === "number") { balanceEpoch++; setBalance(ack.balance); }
      showCombo(gift, typeof ack.combo === "number" ? ack.combo : count);
      if (!messageNode.hidden && messageNode.dataset.kind === "error") status.say("", "info");
    }, function (err) {
      var text = L.errorText(err.code, err.message);
      if (err.code === "insufficient_funds") text += " Use Recharge above.";
      status.say(text, "error", 8000);
      messageNode.dataset.code = err.code;
    });
  }

  function renderGifts() {
    var grid = $("gift-grid");
    grid.textContent = "";
    gifts.forEach(function (g) {
      var coinsLabel = L.fmt(g.coins) + (g.coins === 1 ? " coin" : " coins");
      var btn = el("button", { type: "button", class: "gift-btn", id: "gift-" + g.id, testid: "gift-btn-" + g.id,
        "aria-label": "Send " + g.name + ", " + coinsLabel + (g.streakable ? ", tap again for a combo" : ""),
        dataset: { gift: g.id, coins: g.coins } },
        g.streakable ? el("span", { class: "streak-tag", "aria-hidden": "true", text: "COMBO" }) : null,
        el("span", { class: "gift-emoji", "aria-hidden": "true", text: L.giftIcon(g.id) }),
        el("span", { class: "gift-label", "aria-hidden": "true", text: g.name }),
        el("span", { class: "gift-price", "aria-hidden": "true", text: coinsLabel }));
      btn.disabled = status.ended;
      btn.addEventListener("click", function () { sendGift(g, btn); });
      grid.appendChild(btn);
    });
    if (balance !== null) setBalance(balance);
  }

  function loadGifts() {
    L.api("GET", "/api/gifts").then(function (data) {
      gifts = (data && data.gifts) || [];
      renderGifts();
    }, function (err) {
      status.error(err);
      setTimeout(loadGifts, 3000);
    });
  }

  // ------------------------------------------------------------ live feed

  var feed = new L.Feed($("feed"), { tiers: tiers, max: 150 });

  function onEvent(ev, meta) {
    meta = meta || {};
    switch (ev.type) {
      case "welcome":
        me = ev.you || null;
        feed.me = me ? me.id : null;
        if (typeof ev.viewers === "number") $("viewers").textContent = L.fmt(ev.viewers);
        if (ev.creator) {
          var title = ev.creator.name || ev.creator.id;
          $("stream-title").textContent = title;
          document.title = title + " is live \u00B7 livegift";
        }
        break;
      case "gift":
        feed.gift(ev, meta);
        break;
      case "shoutout":
        var row = feed.shoutout(ev, meta);
        if (row.dataset.mine === "true" && !meta.history) {
          status.say("\u{1F4E3} The creator gave you a shout-out: " + (ev.text || ""), "success", 8000);
        }
        break;
      case "viewers":
        if (typeof ev.count === "number") $("viewers").textContent = L.fmt(ev.count);
        break;
      case "resumed":
        if (ev.complete === false && !meta.history) feed.notice("Reconnected; some older events could not be replayed.", "warning");
        break;
      case "stream_ended":
        status.end();
        break;
    }
  }

  var client = L.connect({
    room: ctx.room,
    token: ctx.token,
    history: true,
    onEvent: onEvent,
    onStatus: status.onStatus
  });
  window.watch = { client: client, feed: feed };

  loadGifts();
  loadPackages();
  loadWallet();
})();
