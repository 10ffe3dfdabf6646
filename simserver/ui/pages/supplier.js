// Supplier check: a site's images -> does it sell the domain's target? The verdict, the fraction,
// and per image its evidence (nearest target and non-target items).
"use strict";
UI.page({
  id: "supplier",
  title: "Supplier check",
  async render(main, { domain }) {
    const { h, api, path, num, pct } = UI;
    const err = UI.errorBox();
    let files = [];
    const go = h("button", { type: "submit", id: "check-button" }, "Check the site");
    const verdict = h("section", { id: "verdict", "aria-live": "polite" });
    const images = h("div", { id: "site-images" });
    main.append(
      h("p", {}, `Drop a supplier site's images (or a zip of them): each is compared with ${domain}'s catalog. Only domains with a target label answer; others say so.`),
    );
    async function check() {
      if (!files.length) throw new Error("choose the site's images first");
      const { form, sent } = UI.uploadForm(files);
      show(await api("POST", path("relevance"), { form }), sent);
    }
    const form = UI.form(
      go,
      err,
      check,
      UI.dropZone({ id: "site-files", label: "Site images", accept: "image/*,.zip", multiple: true, onFiles: (f) => (files = f) }),
    );
    main.append(form, verdict, images);

    function show(r, local) {
      verdict.className = r.relevant ? "verdict yes" : "verdict no";
      verdict.replaceChildren(
        h("h3", {}, r.relevant ? `Relevant: this site sells ${r.target}` : `Not relevant: no sign of ${r.target}`),
        h(
          "p",
          {},
          `${pct(r.fraction)} of ${r.images.length} images are similar to ${r.target} (needed: ${pct(r.site_threshold)}, rule: ${r.site_rule}; image margin threshold ${num(r.image_threshold)}).`,
          r.skipped.length ? ` Skipped: ${r.skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}.` : "",
        ),
      );
      images.replaceChildren(
        h(
          "ol",
          { class: "site-list" },
          r.images.map((im) => {
            const f = local.get(im.name);
            const target = im.nearest.filter((n) => n.label === r.target);
            const other = im.nearest.filter((n) => n.label !== r.target);
            const hit = (n) => h("figure", { class: "evidence" }, UI.thumb(domain, n.id, r.version, n.name), h("figcaption", {}, `${n.label} · ${num(n.score)}`));
            return h(
              "li",
              { class: im.similar ? "site-image similar" : "site-image", dataset: { name: im.name } },
              h("figure", { class: "query" }, f ? h("img", { src: URL.createObjectURL(f), alt: im.name, class: "thumb" }) : null, h("figcaption", {}, im.name)),
              h("div", { class: "facts" }, h("strong", {}, im.similar ? "similar" : "not similar"), ` similarity ${num(im.similarity)}, margin ${num(im.margin)}`),
              h("div", { class: "nearest" }, h("span", {}, `nearest ${r.target}:`), target.length ? target.map(hit) : h("em", {}, " none among the nearest")),
              h("div", { class: "nearest" }, h("span", {}, "nearest others:"), other.length ? other.map(hit) : h("em", {}, " none")),
            );
          }),
        ),
      );
    }
  },
});
