// The status page's live part: polls status.json every few seconds and updates each project's
// training card (fields and uPlot plots), the summary and the recent errors. Every value is set
// with textContent, never as HTML: labels and messages come from Label Studio and requests.
(function () {
  "use strict";

  const POLL_MS = Number(document.body.dataset.pollMs) || 2000;
  const charts = new Map(); // "<project>/<series>" -> uPlot

  function format(value) {
    if (value === null || value === undefined) return "-";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "number") {
      return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
    }
    if (Array.isArray(value)) return value.map(format).join(", ");
    if (typeof value === "object") {
      return Object.entries(value).map(([key, item]) => key + " " + format(item)).join(", ");
    }
    return String(value);
  }

  function clock(unixSeconds) {
    return new Date(unixSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function runCard(project) {
    // Compared as data, not put into a CSS selector: a project id is never parsed as markup or CSS.
    for (const card of document.querySelectorAll("article.run")) {
      if (card.dataset.project === project) return card;
    }
    const runs = document.getElementById("runs");
    const template = document.getElementById("run-template");
    if (!runs || !template) return null;
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.project = project;
    card.querySelector(".project").textContent = project || "default";
    runs.appendChild(card);
    const empty = document.getElementById("no-runs");
    if (empty) empty.remove();
    return card;
  }

  function plot(card, project, series, points) {
    const element = card.querySelector('.plot[data-series="' + series + '"]');
    if (!element || typeof uPlot === "undefined") return;
    const data = [points.map((p) => p[0]), points.map((p) => p[1])];
    const key = project + "/" + series;
    let chart = charts.get(key);
    if (!chart) {
      const width = Math.max(240, Math.min(element.clientWidth || 360, 560));
      chart = new uPlot(
        {
          width: width,
          height: 160,
          legend: { show: false },
          cursor: { show: false },
          scales: { x: { time: false }, y: series === "val_dice" ? { range: [0, 1] } : { auto: true } },
          // Steps are whole numbers: no tick at step 2.5.
          axes: [{ size: 30, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] }, { size: 46 }],
          series: [
            {},
            {
              label: series,
              stroke: series === "loss" ? "#c0392b" : "#1f6fb2",
              width: 2,
              points: { show: series === "val_dice" || points.length < 3 },
            },
          ],
        },
        data,
        element,
      );
      charts.set(key, chart);
    } else {
      chart.setData(data);
    }
    element.dataset.points = String(points.length);
  }

  function updateRun(project, fields) {
    const card = runCard(project);
    if (!card) return;
    for (const cell of card.querySelectorAll("dd[data-field]")) {
      cell.textContent = format(fields[cell.dataset.field]);
    }
    const state = card.querySelector(".state");
    state.textContent = fields.state || "idle";
    state.dataset.state = fields.state || "idle";
    const problems = card.querySelector(".problems");
    problems.replaceChildren(
      ...(fields.problems || []).map((problem) => {
        const item = document.createElement("li");
        item.textContent = problem;
        return item;
      }),
    );
    const history = fields.history || { loss: [], val_dice: [] };
    plot(card, project, "loss", history.loss || []);
    plot(card, project, "val_dice", history.val_dice || []);
  }

  function updateErrors(errors) {
    const list = document.getElementById("error-list");
    if (!list) return;
    list.replaceChildren(
      ...errors.map((error) => {
        const item = document.createElement("li");
        const time = document.createElement("time");
        time.textContent = clock(error.time);
        const level = document.createElement("span");
        level.className = "level";
        level.textContent = error.level;
        const logger = document.createElement("span");
        logger.className = "logger";
        logger.textContent = error.logger;
        const message = document.createElement("span");
        message.className = "message";
        message.textContent = error.message;
        item.append(time, " ", level, " ", logger, document.createElement("br"), message);
        return item;
      }),
    );
    const empty = document.querySelector("#errors p.empty");
    if (empty) empty.hidden = errors.length > 0;
  }

  function update(report) {
    document.getElementById("updated").textContent = clock(report.generated);
    const summary = document.getElementById("summary");
    summary.dataset.status = report.status;
    const status = summary.querySelector(".badge");
    if (status) status.lastChild.textContent = " " + report.status;
    for (const [project, fields] of Object.entries(report.training || {})) updateRun(project, fields);
    updateErrors(report.errors || []);
  }

  async function poll() {
    const connection = document.getElementById("connection");
    try {
      const response = await fetch("status.json", { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      update(await response.json());
      connection.textContent = "";
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (error) {
      connection.textContent = "(backend not answering: " + error.message + ")";
    } finally {
      window.setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
