// Domains: each domain's version, item count, labels, encoder and evaluation summary.
"use strict";
UI.page({
  id: "domains",
  title: "Domains",
  async render(main) {
    const { h, pct } = UI;
    await UI.refreshDomains();
    main.append(
      h(
        "div",
        { class: "cards" },
        UI.state.domains.map((d) => {
          const ev = d.evaluation;
          const labels = Object.entries(d.labels || {});
          return h(
            "section",
            { class: "domain-card", dataset: { domain: d.name } },
            h("h3", {}, d.name),
            h("p", {}, d.description),
            h(
              "dl",
              {},
              h("dt", {}, "version"), h("dd", {}, d.version || "none yet (train it)"),
              h("dt", {}, "items"), h("dd", { class: "count" }, String(d.count)),
              h("dt", {}, "encoder"), h("dd", {}, d.serving_encoder || d.encoder),
              h("dt", {}, "metric"), h("dd", {}, d.metric),
              ev ? [h("dt", {}, "Recall@1"), h("dd", {}, `pretrained ${pct(ev.pretrained && ev.pretrained.recall_at_1)}, fine-tuned ${pct(ev.finetuned && ev.finetuned.recall_at_1)}`)] : null,
              ev ? [h("dt", {}, "promoted"), h("dd", {}, ev.promoted ? "yes" : "no", h("small", {}, ` ${ev.reason}`))] : null,
              d.store_error ? [h("dt", {}, "store"), h("dd", { class: "error" }, d.store_error)] : null,
            ),
            labels.length
              ? h("p", { class: "labels" }, labels.slice(0, 40).map(([l, n]) => h("span", { class: "chip" }, `${l} ${n}`)), labels.length > 40 ? ` +${labels.length - 40} more` : "")
              : null,
            h(
              "p",
              { class: "actions" },
              h("a", { href: "#search", onclick: () => pick(d.name) }, "Search"), " · ",
              h("a", { href: "#catalog", onclick: () => pick(d.name) }, "Catalog"), " · ",
              h("a", { href: "#dupes", onclick: () => pick(d.name) }, "Duplicates"), " · ",
              h("a", { href: "#training", onclick: () => pick(d.name) }, "Train"),
            ),
          );
        }),
      ),
    );
    function pick(name) {
      UI.state.domain = name;
      document.getElementById("domain").value = name;
    }
  },
});
