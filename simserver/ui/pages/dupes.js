// Duplicates: is an image a copy of a catalog item, or only a look-alike? And the catalog's own
// duplicate groups, side by side, with the extras removed on request (confirmed).
// (The file is not named duplicates.js: page files must not share a name with a domain route.)
"use strict";
UI.page({
  id: "dupes",
  title: "Duplicates",
  async render(main, { domain, info }) {
    const { h, api, path, num, pct } = UI;
    const POLL_MS = 500;
    if (!info || !info.version) {
      main.append(h("p", { class: "empty" }, `Domain ${domain} has no version yet: train it first.`));
      return;
    }

    /** An item's thumbnail with what is known about it; kind: "keep", "copy", "look-alike" or "extra". */
    function item(kind, id, version, ...facts) {
      return h(
        "figure",
        { class: `match ${kind.replace(" ", "-")}`, dataset: { id, kind } },
        UI.thumb(domain, id, version, id),
        h("figcaption", {}, h("strong", {}, kind), " ", h("span", { class: "name" }, id), ...facts.map((f) => [h("br"), f])),
      );
    }

    // -- check images against the catalog --------------------------------------------------------
    let files = [];
    const err = UI.errorBox();
    const go = h("button", { type: "submit", id: "dupe-check-button" }, "Check");
    const checked = h("section", { id: "dupe-results", "aria-live": "polite" });
    async function check() {
      if (!files.length) throw new Error("choose the images to check first");
      const { form, sent } = UI.uploadForm(files);
      showCheck(await api("POST", path("duplicates/check"), { form }), sent);
    }
    function showCheck(r, local) {
      checked.replaceChildren(
        h(
          "p",
          { class: "note" },
          `A match is a copy when its same-item probability is at least ${pct(r.threshold)} (`,
          r.calibrated ? "calibrated on this domain's images" : "not calibrated yet: a default rule",
          `); version ${r.version}.`,
          r.skipped.length ? ` Skipped: ${r.skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}.` : "",
        ),
        h(
          "ol",
          { class: "site-list" },
          r.results.map((res) => {
            const f = local.get(res.name);
            const copy = res.matches.find((m) => m.same_item >= r.threshold);
            return h(
              "li",
              { class: res.duplicate ? "dupe-result copy" : "dupe-result", dataset: { name: res.name, duplicate: String(res.duplicate) } },
              h("figure", { class: "query" }, f ? h("img", { src: URL.createObjectURL(f), alt: res.name, class: "thumb" }) : null, h("figcaption", {}, res.name)),
              h("p", { class: "facts" }, h("strong", {}, copy ? `A copy of ${copy.id}` : "Not a copy"), copy ? ` (${copy.label})` : ": the nearest items are look-alikes at most"),
              h(
                "div",
                { class: "matches" },
                res.matches.length ? null : h("em", {}, "no catalog item is close enough to compare"),
                res.matches.map((m) =>
                  item(m.same_item >= r.threshold ? "copy" : "look-alike", m.id, r.version, m.label, `score ${num(m.score)} · same item ${pct(m.same_item)}`, `${m.inliers} inliers · template match ${num(m.ncc ?? 0)} / edges ${num(m.edge_ncc ?? 0)} · detail ${num(m.detail_ncc ?? 0)}`),
                ),
              ),
            );
          }),
        ),
      );
    }
    const checkForm = UI.form(
      go,
      err,
      check,
      h("h3", {}, "Check images"),
      h("p", { class: "note" }, `Is each image a copy of an item in ${domain}'s catalog (cropped, re-compressed, mirrored, …), or only a look-alike?`),
      UI.dropZone({ id: "dupe-files", label: "Images to check", accept: "image/*,.zip", multiple: true, onFiles: (f) => ((files = f), UI.busy(go, err, check)) }),
    );

    // -- the catalog's duplicate groups ----------------------------------------------------------
    const scan = h("button", { type: "submit", id: "groups-button" }, "Find duplicate groups");
    const gerr = UI.errorBox();
    const status = h("p", { id: "groups-status", "aria-live": "polite" });
    const groups = h("section", { id: "groups" });
    async function findGroups() {
      groups.replaceChildren();
      const { task_id } = await api("POST", path("duplicates/submit"));
      const started = Date.now();
      for (;;) {
        const st = await api("GET", path("duplicates/status"), { params: { task_id } });
        status.textContent = `Scanning ${info.count} items: ${st.status.replace("_", " ")} · ${((Date.now() - started) / 1000).toFixed(1)} s`;
        status.dataset.status = st.status;
        if (st.status !== "pending" && st.status !== "in_progress") break;
        await new Promise((r) => setTimeout(r, POLL_MS));
      }
      showGroups(await api("GET", path("duplicates/get"), { params: { task_id } })); // a failure: its error
    }
    function showGroups(r) {
      status.dataset.status = "done";
      status.textContent =
        `${r.items} items scanned in ${r.seconds.toFixed(1)} s: ${r.candidate_pairs} candidate pairs, ${r.verified_pairs} verified; ` +
        `${r.groups.length} groups, ${r.to_remove.length} extras to remove (version ${r.version}).`;
      if (!r.groups.length) {
        groups.replaceChildren(h("p", { class: "empty" }, "No duplicates found."));
        return;
      }
      const rows = r.groups.map((g) => {
        const remove = h("button", { type: "button", class: "danger remove-extras", "aria-label": `Remove the extras of ${g.keep}` }, `Remove ${g.duplicates.length} extra${g.duplicates.length > 1 ? "s" : ""}`);
        const box = UI.errorBox();
        const actions = h("div", { class: "group-actions" }, remove, box);
        const row = h(
          "li",
          { class: "group", dataset: { keep: g.keep } },
          item("keep", g.keep, r.version, "the oldest"),
          g.duplicates.map((d, i) => item("extra", d, r.version, `same item ${pct(g.scores[i])}`)),
          actions,
        );
        remove.addEventListener("click", () => removeExtras(remove, box, g.duplicates, [row]));
        return row;
      });
      const all = h("button", { type: "button", class: "danger", id: "remove-all" }, `Remove all ${r.to_remove.length} extras`);
      const allErr = UI.errorBox();
      all.addEventListener("click", () => removeExtras(all, allErr, r.to_remove, rows));
      groups.replaceChildren(h("ol", { class: "groups" }, rows), h("div", { class: "group-actions" }, all, allErr));
    }
    /** Delete ids (confirmed); the rows whose extras they are say so. */
    async function removeExtras(button, box, ids, rows) {
      if (!confirm(`Delete ${ids.length} item${ids.length > 1 ? "s" : ""} from ${domain} (${ids.join(", ")})? Searches stop finding them at once.`)) return;
      await UI.busy(button, box, async () => {
        const r = await api("POST", path("items/delete"), { json: { ids } });
        for (const row of rows) {
          row.classList.add("removed");
          const actions = row.querySelector(".group-actions");
          if (actions) actions.replaceChildren(h("span", { class: "done" }, `Extras removed: ${r.count} items now (version ${r.version}).`));
        }
        if (button.id === "remove-all") button.replaceWith(h("span", { class: "done" }, `Removed ${r.deleted}: ${r.count} items now.`));
        await UI.refreshDomains();
      });
    }
    const groupsForm = UI.form(
      scan,
      gerr,
      findGroups,
      h("h3", {}, "Duplicate groups in the catalog"),
      h("p", { class: "note" }, "Every item's nearest items, verified geometrically and joined into groups; each group keeps its oldest item."),
    );
    groupsForm.append(status);
    main.append(checkForm, checked, groupsForm, groups);
  },
});
