// Search: a query image (drop, pick or paste), top-K, label and metadata filters, a gallery;
// a result's details and "more like this".
"use strict";
UI.page({
  id: "search",
  title: "Search",
  async render(main, { domain, info }) {
    const { h, api, path } = UI;
    if (!info || !info.version) {
      main.append(h("p", { class: "empty" }, `Domain ${domain} has no version yet: train it first.`));
      return;
    }
    let query = null;
    const err = UI.errorBox();
    const topK = h("input", { type: "number", id: "top-k", min: "1", max: "100", value: String(info.top_k) });
    const labels = h(
      "select",
      { id: "label-filter", multiple: true, size: "4" },
      Object.keys(info.labels || {}).sort().map((l) => h("option", { value: l }, l)),
    );
    const meta = h("input", { type: "text", id: "meta-filter", placeholder: "brand=acme, color=red" });
    const go = h("button", { type: "submit", id: "search-button" }, "Search");
    const heading = h("h3", { id: "results-heading", "aria-live": "polite" });
    const results = h("div", { id: "results" });
    const details = h("aside", { id: "details", class: "details", hidden: true });

    function filter() {
      const f = {};
      const chosen = Array.from(labels.selectedOptions).map((o) => o.value);
      if (chosen.length) f.label = { in: chosen };
      for (const part of meta.value.split(",").map((s) => s.trim()).filter(Boolean)) {
        const at = part.indexOf("=");
        if (at < 1) throw new Error(`metadata filter: write column=value, not ${JSON.stringify(part)}`);
        f[`metadata.${part.slice(0, at).trim()}`] = part.slice(at + 1).trim();
      }
      return Object.keys(f).length ? JSON.stringify(f) : null;
    }

    function show(reply, title) {
      heading.textContent = `${title}: ${reply.results.length} results (version ${reply.version})`;
      results.replaceChildren(UI.gallery(domain, reply.version, reply.results, (hit) => open(hit, reply.version)));
    }

    async function search() {
      if (!query) throw new Error("choose a query image first");
      const form = new FormData();
      form.append("image", query, query.name || "pasted.png");
      form.append("top_k", topK.value);
      const f = filter();
      if (f) form.append("filter", f);
      show(await api("POST", path("search"), { form }), "Search");
    }

    async function open(hit, version) {
      const derr = UI.errorBox();
      const more = h("button", { type: "button", id: "more-like-this" }, "More like this");
      details.hidden = false;
      details.replaceChildren(
        h("button", { type: "button", class: "close", "aria-label": "Close details", onclick: () => (details.hidden = true) }, "×"),
        h("h3", {}, hit.name),
        UI.thumb(domain, hit.id, version, hit.name),
        h("dl", { id: "item-details" }, h("dt", {}, "id"), h("dd", {}, hit.id), h("dt", {}, "label"), h("dd", {}, hit.label)),
        more,
        derr,
      );
      more.addEventListener("click", () =>
        UI.busy(more, derr, async () => {
          const reply = await api("GET", path("similar"), { params: { id: hit.id, top_k: topK.value, filter: filter() } });
          show(reply, `More like ${hit.name}`);
        }),
      );
      more.focus();
      try {
        const item = await api("GET", path(`items/${hit.id.split("/").map(encodeURIComponent).join("/")}`));
        const dl = details.querySelector("dl");
        for (const [k, v] of Object.entries({ created: item.created_at, ...item.metadata })) {
          dl.append(h("dt", {}, k), h("dd", {}, v || "–"));
        }
      } catch (e) {
        UI.showError(derr, e);
      }
    }

    const form = UI.form(
      go,
      err,
      search,
      UI.dropZone({ id: "query-file", label: "Query image", accept: "image/*", onFiles: (f) => ((query = f[0]), UI.busy(go, err, search)) }),
      h("div", { class: "row" }, UI.field("Top K", topK), UI.field("Labels", labels, "none chosen: all"), UI.field("Metadata", meta, "column=value, comma-separated")),
    );
    main.append(form, h("div", { class: "split" }, h("section", {}, heading, results), details));
  },
});
