// Catalog: browse items by label, a page at a time; add images; delete an item (confirmed).
"use strict";
UI.page({
  id: "catalog",
  title: "Catalog",
  async render(main, { domain, info }) {
    const { h, api, path } = UI;
    const PAGE = 24;
    let offset = 0;
    const err = UI.errorBox();
    const label = h(
      "select",
      { id: "catalog-label" },
      h("option", { value: "" }, "all labels"),
      Object.keys((info && info.labels) || {}).sort().map((l) => h("option", { value: l }, l)),
    );
    const status = h("p", { id: "catalog-status", "aria-live": "polite" });
    const grid = h("div", { id: "catalog-grid" });
    const prev = h("button", { type: "button", id: "prev-page" }, "← Previous");
    const next = h("button", { type: "button", id: "next-page" }, "Next →");

    async function load() {
      if (!info || !info.version) {
        status.textContent = `Domain ${domain} has no version yet: add images or train it.`;
        grid.replaceChildren();
        return;
      }
      const page = await api("GET", path("items"), { params: { label: label.value, offset, limit: PAGE } });
      const last = Math.min(page.total, offset + page.items.length);
      status.textContent = page.total ? `Items ${offset + 1}–${last} of ${page.total} (version ${page.version})` : "No items.";
      prev.disabled = offset === 0;
      next.disabled = last >= page.total;
      grid.replaceChildren(
        h(
          "ul",
          { class: "gallery" },
          page.items.map((item) => {
            const del = h("button", { type: "button", class: "danger", "aria-label": `Delete ${item.id}` }, "Delete");
            const derr = UI.errorBox();
            del.addEventListener("click", () => {
              if (!confirm(`Delete ${item.id} from ${domain}? Searches stop finding it at once.`)) return;
              UI.busy(del, derr, async () => {
                await api("DELETE", path(`items/${item.id.split("/").map(encodeURIComponent).join("/")}`));
                await UI.refreshDomains();
                await load();
              });
            });
            return h(
              "li",
              { class: "card", dataset: { id: item.id } },
              UI.thumb(domain, item.id, page.version, item.name),
              h("span", { class: "label" }, item.label),
              h("span", { class: "name" }, item.name),
              del,
              derr,
            );
          }),
        ),
      );
    }
    const run = (button, fn) => UI.busy(button, err, fn);
    label.addEventListener("change", () => ((offset = 0), run(next, load)));
    prev.addEventListener("click", () => ((offset = Math.max(0, offset - PAGE)), run(prev, load)));
    next.addEventListener("click", () => ((offset += PAGE), run(next, load)));

    // Adding images: files of one label, without a training (POST /{domain}/items).
    let files = [];
    const addErr = UI.errorBox();
    const addLabel = h("input", { type: "text", id: "add-label", required: true, placeholder: "e.g. dress" });
    const add = h("button", { type: "submit", id: "add-button" }, "Add to catalog");
    const added = h("p", { id: "add-result", "aria-live": "polite" });
    async function addImages() {
      if (!files.length) throw new Error("choose the images to add first");
      const form = new FormData();
      for (const f of files) form.append("images", f, f.name);
      form.append("label", addLabel.value);
      const r = await api("POST", path("items"), { form });
      added.textContent = `Added ${r.added}, replaced ${r.replaced}, skipped ${r.skipped.length}; ${r.count} items now.`;
      await UI.refreshDomains();
      info = UI.currentDomain();
      await load();
    }
    const addForm = UI.form(
      add,
      addErr,
      addImages,
      h("h3", {}, "Add images"),
      UI.dropZone({ id: "add-files", label: "Images to add", accept: "image/*", multiple: true, onFiles: (f) => (files = f) }),
      UI.field("Label", addLabel),
    );
    addForm.append(added);
    main.append(h("div", { class: "row" }, UI.field("Label", label), prev, next), err, status, grid, addForm);
    await load();
  },
});
