/*
 * Tether guard collector: gathers the browser fingerprint (document B:
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

  var form = document.getElementById("guard-form");
  if (!form) return;
  var fingerprint = collect();
  window.tetherFingerprint = fingerprint;

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    var action = form.dataset.action;
    var account = document.getElementById("account").value;
    var room = document.getElementById("room");
    document.body.dataset.guardState = "pending";
    try {
      var response = await fetch("/guard/evaluate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          action: action,
          account: account,
          room_id: room ? room.value : "",
          components: await fingerprint
        })
      });
      var data = await response.json();
      if (!response.ok) {
        show("refusal", data.error || "The request was not accepted.");
        document.body.dataset.guardState = "error";
        return;
      }
      if (data.verdict === "allow") {
        var done = { register: "registered", login: "logged in", collaborate: "joined the room" };
        var note = data.limit ? " (" + data.count + " of " + data.limit + " for this browser)" : "";
        show("result", account + ": " + done[action] + note + ".");
        document.body.dataset.guardState = "allow";
      } else {
        show("refusal", data.prompt);
        document.body.dataset.guardState = "deny";
      }
      document.body.dataset.identity = data.identity;
    } catch (error) {
      show("refusal", "Could not reach the server: " + error);
      document.body.dataset.guardState = "error";
    }
  });
})();
