/*
 * Tether guard collector: gathers the browser fingerprint (the
 * browser type and version, operating system, screen size and resolution,
 * fonts, plugins, language) with FingerprintJS (MIT, vendored as fp.min.js)
 * plus the user agent, sends it with the action, and shows the verdict.
 * The IP address is taken by the server, never from the page.
 */
(function () {
  "use strict";

  function browserOf(ua) {
    var rules = [
      ["Edge", /Edg\/([\d.]+)/], ["Opera", /OPR\/([\d.]+)/],
      ["Samsung Internet", /SamsungBrowser\/([\d.]+)/], ["Firefox", /Firefox\/([\d.]+)/],
      ["Chrome", /(?:Headless)?Chrom(?:e|ium)\/([\d.]+)/], ["Safari", /Version\/([\d.]+).*Safari/]
    ];
    for (var i = 0; i < rules.length; i++) {
      var m = ua.match(rules[i][1]);
      if (m) return { name: rules[i][0], version: m[1] };
    }
    return { name: "Other", version: "unknown" };
  }

  function osOf(ua) {
    var rules = [
      ["Windows", /Windows NT ([\d.]+)/], ["Android", /Android ([\d.]+)/],
      ["iOS", /(?:iPhone|CPU) OS ([\d_]+)/], ["macOS", /Mac OS X ([\d_.]+)/],
      ["ChromeOS", /CrOS \S+ ([\d.]+)/], ["Linux", /(Linux)/]
    ];
    for (var i = 0; i < rules.length; i++) {
      var m = ua.match(rules[i][1]);
      if (m) return { name: rules[i][0], version: m[1] === "Linux" ? "" : m[1].replace(/_/g, ".") };
    }
    return { name: "Other", version: "" };
  }

  function valueOf(components, name, fallback) {
    var c = components[name];
    return c && c.value !== undefined && c.value !== null ? c.value : fallback;
  }

  function digest(value) {
    return FingerprintJS.murmurX64Hash128(JSON.stringify(value));
  }

  async function collect() {
    var agent = await FingerprintJS.load({ monitoring: false });
    var result = await agent.get();
    var c = result.components;
    var ua = navigator.userAgent;
    var browser = browserOf(ua);
    var os = osOf(ua);
    var plugins = valueOf(c, "plugins", []).map(function (p) {
      return p.description ? p.name + ": " + p.description : p.name;
    });
    return {
      browser_name: browser.name,
      browser_version: browser.version,
      os_name: os.name,
      os_version: os.version,
      screen_width: screen.width,
      screen_height: screen.height,
      pixel_ratio: window.devicePixelRatio || 0,
      color_depth: screen.colorDepth || 0,
      fonts: valueOf(c, "fonts", []),
      plugins: plugins,
      languages: navigator.languages && navigator.languages.length
        ? Array.prototype.slice.call(navigator.languages) : [navigator.language],
      timezone: valueOf(c, "timezone", ""),
      platform: valueOf(c, "platform", ""),
      extra: {
        canvas: digest(valueOf(c, "canvas", null)),
        webgl: digest(valueOf(c, "webGlBasics", null)),
        hardware_concurrency: String(valueOf(c, "hardwareConcurrency", "")),
        touch: digest(valueOf(c, "touchSupport", null)),
        vendor: String(valueOf(c, "vendor", ""))
      }
    };
  }

  function show(id, text) {
    ["result", "refusal"].forEach(function (other) {
      document.getElementById(other).hidden = other !== id;
    });
    var target = id === "refusal" ? document.getElementById("refusal-text")
      : document.getElementById(id);
    target.textContent = text;
  }

  // The identity of this browser's last verdict: logging out and leaving a
  // room free the slot of that identity. Kept across page loads.
  var IDENTITY_KEY = "tether.guard.identity";

  function remember(identity) {
    document.body.dataset.identity = identity;
    try { localStorage.setItem(IDENTITY_KEY, identity); } catch (ignored) { /* private mode */ }
  }

  function remembered() {
    try { return localStorage.getItem(IDENTITY_KEY) || ""; } catch (ignored) { return ""; }
  }

  // Posts body as JSON; the answer's JSON, or null after showing the problem.
  async function post(url, body) {
    document.body.dataset.guardState = "pending";
    try {
      var response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body)
      });
      var data = await response.json();
      if (response.ok) return data;
      show("refusal", data.error || "The request was not accepted.");
    } catch (error) {
      show("refusal", "Could not reach the server: " + error);
    }
    document.body.dataset.guardState = "error";
    return null;
  }

  var form = document.getElementById("guard-form");
  if (!form) return;
  var fingerprint = collect();
  window.tetherFingerprint = fingerprint;
  var action = form.dataset.action;
  var known = remembered();
  if (known) document.body.dataset.identity = known;

  function account() {
    return document.getElementById("account").value;
  }

  function roomId() {
    var room = document.getElementById("room");
    return room ? room.value : "";
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    var name = account();
    var data = await post("/guard/evaluate", {
      action: action,
      account: name,
      room_id: roomId(),
      components: await fingerprint
    });
    if (!data) return;
    if (data.verdict === "allow") {
      var done = { register: "registered", login: "logged in", collaborate: "joined the room" };
      var note = data.limit ? " (" + data.count + " of " + data.limit + " for this browser)" : "";
      show("result", name + ": " + done[action] + note + ".");
      document.body.dataset.guardState = "allow";
    } else {
      show("refusal", data.prompt);
      document.body.dataset.guardState = "deny";
    }
    remember(data.identity);
  });

  // Log out / leave the room: frees the account's slot for this browser.
  var release = document.getElementById("release");
  if (!release) return;
  release.addEventListener("click", async function () {
    var name = account();
    var identity = document.body.dataset.identity;
    if (!identity) {
      show("result", "Nothing to free: this browser has not been admitted yet.");
      document.body.dataset.guardState = "not-held";
      return;
    }
    var body = { account: name, identity: identity };
    if (action === "collaborate") body.room_id = roomId();
    var data = await post(release.dataset.endpoint, body);
    if (!data) return;
    var freed = action === "collaborate" ? data.left : data.ended;
    var done = { login: "logged out", collaborate: "left the room" };
    var none = { login: "not logged in from this browser", collaborate: "not in the room" };
    show("result", name + ": " + (freed ? done[action] : none[action]) + ".");
    document.body.dataset.guardState = freed ? "released" : "not-held";
  });
})();
