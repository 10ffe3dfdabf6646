// The web interface's core: pages, the API, shared widgets. Plain browser JavaScript, no build.
"use strict";

const UI = (() => {
  const pages = [];
  const state = { domains: [], domain: null };
  const KEY = "simserver.apiKey"; // sessionStorage: gone when the tab closes

  // -- DOM ----------------------------------------------------------------------------------------
  /** h("div", {class: "x", onclick: f}, child, ...): an element; strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // -- API ----------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** fetch + JSON; a refusal throws ApiError with the server's {"error": ...} text. */
  async function api(method, path, { form, json, params } = {}) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    const init = { method, headers: authHeaders() };
    if (form) init.body = form;
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    }
    let r;
    try {
      r = await fetch(url, init);
    } catch (e) {
      throw new ApiError(0, `cannot reach the server (${e.message})`);
    }
    const text = await r.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!r.ok) {
      const msg = body && typeof body.error === "string" ? body.error : text.slice(0, 300) || r.statusText;
      const hint = r.status === 401 || r.status === 403 ? " (enter the API key at the top)" : "";
      throw new ApiError(r.status, `${r.status}: ${msg}${hint}`);
    }
    return body;
  }

  const enc = (id) => String(id).split("/").map(encodeURIComponent).join("/");
  const path = (suffix) => `/${encodeURIComponent(state.domain)}/${suffix}`;

  /** An <img> of a stored item (fetched with the API key when one is set: an <img src> cannot send it). */
  function thumb(domain, id, version, alt) {
    const img = h("img", { alt: alt || id, loading: "lazy", class: "thumb" });
    const url = `/${encodeURIComponent(domain)}/images/${enc(id)}` + (version ? `?version=${encodeURIComponent(version)}` : "");
    if (!sessionStorage.getItem(KEY)) {
      img.src = url;
    } else {
      fetch(url, { headers: authHeaders() })
        .then((r) => (r.ok ? r.blob() : Promise.reject(r.status)))
        .then((b) => (img.src = URL.createObjectURL(b)))
        .catch(() => img.classList.add("missing"));
    }
    return img;
  }

  // -- feedback: errors in words next to the control that caused them -----------------------------
  function errorBox() {
    return h("div", { class: "error", role: "alert", "aria-live": "assertive", hidden: true });
  }
  function showError(box, err) {
    box.textContent = err instanceof Error ? err.message : String(err);
    box.hidden = false;
  }
  function clearError(box) {
    box.textContent = "";
    box.hidden = true;
  }
  /** Run fn() with the button disabled, any error shown in box; returns fn's result or undefined. */
  async function busy(button, box, fn) {
    clearError(box);
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      return await fn();
    } catch (e) {
      showError(box, e);
      return undefined;
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }

  // -- widgets ------------------------------------------------------------------------------------
  /** A drop zone: drag and drop, a file picker (keyboard: Enter/Space), or paste (Ctrl+V).
   *  onFiles(File[]) is called with what was given; accept filters the picker. */
  function dropZone({ label, accept, multiple, onFiles, id }) {
    const input = h("input", { type: "file", accept, multiple, id, class: "visually-hidden" });
    const zone = h(
      "label",
      { class: "drop", for: id, tabindex: "0", role: "button" },
      h("strong", {}, label),
      h("span", {}, multiple ? "drop files here, click to choose, or paste" : "drop a file here, click to choose, or paste"),
    );
    const preview = h("div", { class: "drop-preview" });
    const give = (files) => {
      files = Array.from(files || []).filter((f) => f && f.size >= 0);
      if (!files.length) return;
      preview.replaceChildren(
        ...files.slice(0, 12).map((f) =>
          f.type.startsWith("image/") ? h("img", { src: URL.createObjectURL(f), alt: f.name, class: "thumb small" }) : h("span", { class: "chip" }, f.name),
        ),
        ...(files.length > 12 ? [h("span", { class: "chip" }, `+${files.length - 12} more`)] : []),
      );
      onFiles(files);
    };
    input.addEventListener("change", () => give(input.files));
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        input.click();
      }
    });
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      give(e.dataTransfer.files);
    });
    const onPaste = (e) => {
      if (!zone.isConnected) return document.removeEventListener("paste", onPaste);
      if (e.clipboardData && e.clipboardData.files.length) give(e.clipboardData.files);
    };
    document.addEventListener("paste", onPaste);
    return h("div", { class: "drop-wrap" }, input, zone, preview);
  }

  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
  const num = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

  /** A gallery of hits ({id, name, label, score, metadata}); onPick(hit) on click or Enter. */
  function gallery(domain, version, hits, onPick) {
    if (!hits.length) return h("p", { class: "empty" }, "No results.");
    return h(
      "ol",
      { class: "gallery" },
      hits.map((hit, i) =>
        h(
          "li",
          {},
          h(
            "button",
            { type: "button", class: "card", dataset: { id: hit.id, rank: String(i + 1) }, onclick: () => onPick && onPick(hit) },
            thumb(domain, hit.id, version, hit.name),
            h("span", { class: "score" }, hit.score !== undefined ? `score ${num(hit.score)}` : ""),
            h("span", { class: "label" }, hit.label),
            h("span", { class: "name" }, hit.name),
            Object.keys(hit.metadata || {}).length ? h("span", { class: "meta" }, Object.entries(hit.metadata).map(([k, v]) => `${k}: ${v}`).join(" · ")) : null,
          ),
        ),
      ),
    );
  }

  /** A form of children, then its submit button and error box: submitting runs action() via busy(). */
  function form(button, box, action, ...children) {
    const onsubmit = (e) => {
      e.preventDefault();
      busy(button, box, action);
    };
    return h("form", { class: "controls", onsubmit }, ...children, button, box);
  }

  /** Files as multipart parts: zips as `archive`, the rest as `images`, each under a name unique in
   *  the request (the reply names them). Returns {form, sent}: sent maps each name to its file. */
  function uploadForm(files) {
    const form = new FormData();
    const sent = new Map();
    for (const f of files) {
      const base = f.name || "pasted.png";
      let name = base;
      for (let n = 2; sent.has(name); n++) name = base.replace(/(\.[^.]*)?$/, ` (${n})$1`);
      sent.set(name, f);
      form.append(name.toLowerCase().endsWith(".zip") ? "archive" : "images", f, name);
    }
    return { form, sent };
  }

  /** A labelled form control. */
  function field(label, control, note) {
    return h("label", { class: "field" }, h("span", {}, label), control, note ? h("small", {}, note) : null);
  }

  function currentDomain() {
    return state.domains.find((d) => d.name === state.domain) || null;
  }

  // -- pages and navigation -----------------------------------------------------------------------
  /** Register a page: {id, title, render(container, ctx)}. ctx: {domain, info, refresh}. */
  function page(def) {
    pages.push(def);
  }

  async function loadDomains() {
    state.domains = await api("GET", "/domains");
    const select = document.getElementById("domain");
    const wanted = state.domain || sessionStorage.getItem("simserver.domain");
    state.domain = state.domains.some((d) => d.name === wanted) ? wanted : state.domains[0] && state.domains[0].name;
    select.replaceChildren(...state.domains.map((d) => h("option", { value: d.name, selected: d.name === state.domain }, d.name)));
  }

  async function render() {
    const [id, query] = (location.hash || "#domains").slice(1).split("?");
    const asked = new URLSearchParams(query || "").get("domain"); // links like #search?domain=food
    if (asked && state.domains.some((d) => d.name === asked) && asked !== state.domain) {
      state.domain = asked;
      document.getElementById("domain").value = asked;
    }
    const def = pages.find((p) => p.id === id) || pages[0];
    for (const a of document.querySelectorAll("#nav a")) a.toggleAttribute("aria-current", a.dataset.page === def.id);
    const main = document.getElementById("page");
    main.replaceChildren(h("h2", {}, def.title));
    document.title = `${def.title} · Image similarity`;
    try {
      await def.render(main, { domain: state.domain, info: currentDomain(), refresh: refreshDomains });
    } catch (e) {
      const box = errorBox();
      main.append(box);
      showError(box, e);
    }
  }

  async function refreshDomains() {
    await loadDomains();
  }

  async function start() {
    const nav = document.getElementById("nav");
    nav.replaceChildren(...pages.map((p) => h("a", { href: `#${p.id}`, dataset: { page: p.id } }, p.title)));
    const key = document.getElementById("api-key");
    key.value = sessionStorage.getItem(KEY) || "";
    key.addEventListener("change", () => {
      if (key.value === (sessionStorage.getItem(KEY) || "")) return; // unchanged: keep the page as it is
      if (key.value) sessionStorage.setItem(KEY, key.value);
      else sessionStorage.removeItem(KEY);
      show(); // a server whose searches need the key refused everything before it
    });
    const select = document.getElementById("domain");
    select.addEventListener("change", () => {
      state.domain = select.value;
      sessionStorage.setItem("simserver.domain", state.domain);
      render();
    });
    window.addEventListener("hashchange", render);
    await show();
  }

  /** The domains, then the page; an error (the server down, a key needed) shown instead. */
  async function show() {
    try {
      await loadDomains();
    } catch (e) {
      const box = errorBox();
      document.getElementById("page").replaceChildren(box);
      showError(box, e);
      return;
    }
    await render();
  }

  return { h, api, path, thumb, errorBox, showError, clearError, busy, form, dropZone, gallery, field, uploadForm, pct, num, page, start, state, currentDomain, refreshDomains, ApiError };
})();
