// Training: upload a zip, choose the mode, watch live progress, then the evaluation and the
// promote decision; the versions list with "activate" (rollback).
"use strict";
UI.page({
  id: "training",
  title: "Training",
  async render(main, { domain }) {
    const { h, api, path, pct } = UI;
    const POLL_MS = 500;
    const err = UI.errorBox();
    let archive = null;
    const mode = h("select", { id: "train-mode" }, ["auto", "finetune", "pretrained"].map((m) => h("option", { value: m }, m)));
    const catalog = h(
      "select",
      { id: "train-catalog" },
      h("option", { value: "replace" }, "replace: the zip becomes the catalog"),
      h("option", { value: "merge" }, "merge: upsert into the current catalog"),
    );
    const go = h("button", { type: "submit", id: "train-button" }, "Train");
    const stage = h("p", { id: "train-stage", "aria-live": "polite" });
    const bar = h("progress", { id: "train-bar", max: "1", value: "0", "aria-label": "Training progress" });
    const seen = h("ol", { id: "train-stages", class: "stages" });
    const result = h("section", { id: "train-result" });
    const versions = h("section", { id: "versions" });
    const verr = UI.errorBox();

    const form = UI.form(
      go,
      err,
      train,
      UI.dropZone({ id: "train-file", label: "Training zip", accept: ".zip,application/zip", onFiles: (f) => (archive = f[0]) }),
      h("p", { class: "note" }, "One folder per category (shoes/a.jpg, hats/b.png, …), optional metadata.csv."),
      h("div", { class: "row" }, UI.field("Mode", mode, "auto: fine-tune, keep it only if it wins on the hold-out"), UI.field("Catalog", catalog)),
    );
    main.append(form, h("section", { class: "progress" }, stage, bar, seen), result, h("h3", {}, "Versions"), verr, versions);

    async function train() {
      if (!archive) throw new Error("choose a training zip first");
      const body = new FormData();
      body.append("archive", archive, archive.name);
      body.append("mode", mode.value);
      body.append("catalog", catalog.value);
      result.replaceChildren();
      seen.replaceChildren();
      const { task_id } = await api("POST", path("train/submit"), { form: body });
      stage.textContent = `Task ${task_id} submitted…`;
      const p = await follow(task_id);
      if (p.stage === "failed") throw new Error(`training failed: ${p.error}`);
      showResult(await api("GET", path("train/get"), { params: { task_id } }));
      await UI.refreshDomains();
      await loadVersions();
    }

    /** Poll /train/progress until done or failed; every stage seen is listed. */
    async function follow(taskId) {
      const started = Date.now();
      for (;;) {
        let p;
        try {
          p = await api("GET", path("train/progress"), { params: { task_id: taskId } });
        } catch (e) {
          // The job record is written when the task starts, a moment after the submit answered.
          if (!(e.status === 404 && Date.now() - started < 10000)) throw e;
          await new Promise((r) => setTimeout(r, POLL_MS));
          continue;
        }
        const counts = p.total ? ` ${p.done} / ${p.total}` : p.done ? ` ${p.done}` : "";
        const eta = p.eta_seconds !== null && p.stage !== "done" ? `, about ${Math.ceil(p.eta_seconds)} s left in this stage` : "";
        stage.textContent = `${p.stage}${counts} · ${p.seconds.toFixed(1)} s${eta}`;
        stage.dataset.stage = p.stage;
        if (p.total) {
          bar.max = p.total;
          bar.value = p.done;
        } else if (p.stage === "done") {
          bar.max = 1;
          bar.value = 1;
        } else bar.removeAttribute("value"); // indeterminate
        const last = seen.lastElementChild;
        if (!last || last.dataset.stage !== p.stage) seen.append(h("li", { dataset: { stage: p.stage } }, p.stage));
        if (p.stage === "done" || p.stage === "failed") return p;
        await new Promise((r) => setTimeout(r, POLL_MS));
      }
    }

    function metricsRow(name, m) {
      return h("tr", {}, h("th", { scope: "row" }, name), [m && m.recall_at_1, m && m.recall_at_5, m && m.map_at_r].map((x) => h("td", {}, pct(x))), h("td", {}, m ? String(m.queries) : "–"));
    }

    function showResult(r) {
      const ev = r.evaluation;
      const parts = [
        h("h3", {}, `Version ${r.version}: ${r.indexed} images indexed in ${r.seconds.toFixed(1)} s`),
        r.skipped.length ? h("p", { class: "note" }, `Skipped: ${r.skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}`) : null,
      ];
      if (ev) {
        parts.push(
          h("p", { id: "promotion", class: ev.promoted ? "verdict yes" : "verdict no" }, ev.promoted ? "Fine-tuned encoder promoted. " : "Pretrained encoder kept. ", ev.reason),
          h(
            "table",
            { class: "metrics" },
            h("caption", {}, `Hold-out: ${ev.holdout_images} images; trained on ${ev.train_images} (+${ev.augmented_views} augmented views)`),
            h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "Recall@1"), h("th", {}, "Recall@5"), h("th", {}, "mAP@R"), h("th", {}, "queries"))),
            h("tbody", {}, metricsRow("pretrained", ev.pretrained), metricsRow("fine-tuned", ev.finetuned)),
          ),
        );
        const pre = (ev.pretrained && ev.pretrained.per_class_recall_at_1) || {};
        const fine = (ev.finetuned && ev.finetuned.per_class_recall_at_1) || {};
        // Weakest classes first: where the model needs more or better examples.
        const classes = Object.keys({ ...pre, ...fine }).sort((a, b) => (fine[a] ?? pre[a]) - (fine[b] ?? pre[b]));
        if (classes.length) {
          parts.push(
            h("h4", {}, "Recall@1 per class (weakest first)"),
            h(
              "div",
              { class: "bars" },
              classes.map((c) =>
                h(
                  "div",
                  { class: "bar-row" },
                  h("span", { class: "bar-label" }, c),
                  h("span", { class: "bar pre", style: `width:${100 * (pre[c] ?? 0)}%`, title: `pretrained ${pct(pre[c])}` }),
                  c in fine ? h("span", { class: "bar fine", style: `width:${100 * fine[c]}%`, title: `fine-tuned ${pct(fine[c])}` }) : null,
                  h("span", { class: "bar-value" }, `${pct(pre[c])}${c in fine ? ` → ${pct(fine[c])}` : ""}`),
                ),
              ),
            ),
          );
        }
        if (ev.worst_queries) parts.push(...worstQueries(r.version, ev));
      }
      result.replaceChildren(...parts.filter(Boolean));
    }

    /** The served encoder's hold-out queries whose first result has another label: each query beside
     *  that wrong first result (both are catalog items of the new version). */
    function worstQueries(version, ev) {
      const figure = (id, label, kind) =>
        h("figure", { class: `match ${kind}`, dataset: { id } }, UI.thumb(domain, id, version, id), h("figcaption", {}, h("strong", {}, label), " ", h("span", { class: "name" }, id)));
      const heading = h("h4", {}, `Worst queries (${ev.promoted ? "fine-tuned" : "pretrained"} encoder): first result of another label`);
      if (!ev.worst_queries.length) return [heading, h("p", { class: "empty", id: "worst-queries" }, "None: every hold-out query's first result has its label.")];
      return [
        heading,
        h(
          "ol",
          { class: "worst", id: "worst-queries" },
          ev.worst_queries.map((w) =>
            h(
              "li",
              { class: "worst-query", dataset: { id: w.id } },
              figure(w.id, w.label, "query"),
              h("span", { "aria-hidden": "true" }, "→"),
              figure(w.first.id, w.first.label, "wrong"),
              h("p", { class: "facts" }, `${w.label} queried, ${w.first.label} came first; `, w.correct_rank ? `the first ${w.label} at rank ${w.correct_rank}` : `no ${w.label} found`),
            ),
          ),
        ),
      ];
    }

    async function loadVersions() {
      UI.clearError(verr);
      let list;
      try {
        list = await api("GET", path("versions"));
      } catch (e) {
        UI.showError(verr, e);
        return;
      }
      if (!list.length) {
        versions.replaceChildren(h("p", { class: "empty" }, "No versions yet."));
        return;
      }
      versions.replaceChildren(
        h(
          "table",
          { class: "versions" },
          h("thead", {}, h("tr", {}, ["version", "created", "kind", "items", "Recall@1", ""].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            list.map((v) => {
              const ev = v.evaluation;
              const r1 = ev ? (ev.promoted && ev.finetuned ? ev.finetuned : ev.pretrained) : null;
              const cell = v.active
                ? h("strong", {}, "serving")
                : h("button", { type: "button", class: "activate", "aria-label": `Activate ${v.version}`, onclick: (e) => activate(e.target, v.version) }, "Activate");
              return h(
                "tr",
                { dataset: { version: v.version }, class: v.active ? "active" : null },
                h("td", {}, v.version, v.activated_from ? h("small", {}, ` (= ${v.activated_from})`) : null),
                h("td", {}, v.created_at || "–"),
                h("td", {}, v.kind),
                h("td", {}, String(v.count)),
                h("td", {}, r1 ? pct(r1.recall_at_1) : "–"),
                h("td", {}, cell),
              );
            }),
          ),
        ),
      );
    }

    async function activate(button, version) {
      if (!confirm(`Serve what ${version} served? (A new version of kind "activate"; searches switch at once.)`)) return;
      await UI.busy(button, verr, async () => {
        await api("POST", path(`versions/${encodeURIComponent(version)}/activate`));
        await UI.refreshDomains();
        await loadVersions();
      });
    }

    await loadVersions();
  },
});
