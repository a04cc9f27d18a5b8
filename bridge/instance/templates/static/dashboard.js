// midbridge dashboard: live discovery progress. Vanilla JS, no build step.
// A table with data-poll="<url>" has rows data-run="<sys_id>" whose [data-field] cells are
// refreshed from the JSON endpoint ({"runs": [{sys_id, state, progress, ...}]}): every
// second while a run is active, every 5 s otherwise. A run the page does not show yet
// reloads the page. Values are set with textContent only (never parsed as HTML).
"use strict";
(function () {
  const table = document.querySelector("table[data-poll]");
  if (!table) {
    return;
  }
  const url = table.getAttribute("data-poll");
  const FINAL = new Set(["Completed", "Error", "Cancelled"]);
  const KIND = { Completed: "ok", Error: "bad", Cancelled: "bad" };

  function schedule(ms) {
    window.setTimeout(tick, ms);
  }

  async function tick() {
    let data;
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (response.status === 401) {
        window.location.reload();
        return;
      }
      if (!response.ok) {
        schedule(5000);
        return;
      }
      data = await response.json();
    } catch (err) {
      schedule(5000);
      return;
    }
    let active = false;
    for (const run of data.runs || []) {
      let row = null;
      for (const candidate of table.querySelectorAll("tr[data-run]")) {
        if (candidate.getAttribute("data-run") === run.sys_id) {
          row = candidate;
        }
      }
      if (row === null) {
        window.location.reload();
        return;
      }
      for (const cell of row.querySelectorAll("[data-field]")) {
        const name = cell.getAttribute("data-field");
        if (Object.prototype.hasOwnProperty.call(run, name)) {
          cell.textContent = String(run[name]);
        }
      }
      const badge = row.querySelector(".badge[data-field='state']");
      if (badge) {
        badge.className = "badge " + (KIND[run.state] || "warn");
      }
      const bar = row.querySelector("progress");
      if (bar) {
        bar.value = Number(run.progress) || 0;
      }
      if (!FINAL.has(run.state)) {
        active = true;
      }
    }
    schedule(active ? 1000 : 5000);
  }

  schedule(1000);
})();
