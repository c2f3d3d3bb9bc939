// enrich review: keyboard-first decisions over the server-rendered pages. No dependencies.
"use strict";

(function () {
  const REVIEWER_KEY = "enrichReviewer";
  const RECORDS_KEY = "enrichReviewRecords";
  const QUEUE_KEY = "enrichReviewQueue";
  // The decisions of a page that turned itself, for "u" on the page it opened.
  const CARRIED_KEY = "enrichReviewCarried";
  const undoStack = [];
  // What the page does once decisions are stored or taken back, and when it is shown again
  // after the curator was away (the grid and the record view set them).
  const hooks = { afterUndo: () => {}, afterChange: () => {}, onReturn: async () => {} };
  // Decisions of this page on their way, and how many were answered: what stands, read
  // meanwhile, may be older than they are (see restate).
  let sending = 0;
  let answered = 0;

  function toast(message) {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.classList.add("shown");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => box.classList.remove("shown"), 2500);
  }

  // Team mode's login ended under the page (a 401): every key from now on would be lost,
  // so the page says so until the curator logs in again, and takes no more decisions.
  let loginLost = false;
  function loseLogin() {
    loginLost = true;
    const notice = document.getElementById("login-lost");
    if (!notice) return;
    const link = document.getElementById("login-again");  // the app's login page (url_for)
    link.href = link.getAttribute("href").split("?")[0] + "?next="
      + encodeURIComponent(location.pathname + location.search);
    notice.hidden = false;
    notice.scrollIntoView({ block: "nearest" });
  }

  function reviewer() {
    if (loginLost) {
      toast("Not saved: log in again first");
      return null;
    }
    const input = document.getElementById("reviewer");
    const name = input.value.trim();
    if (!name) {
      toast("Type your name as reviewer first");
      input.focus();
      return null;
    }
    return name;
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status === 401) loseLogin();
    if (!response.ok) {
      const failure = new Error(answer.error || response.statusText);
      failure.answer = answer;
      throw failure;
    }
    return answer;
  }

  // This page's decisions and undos go out one after the other, in the order the curator
  // made them: each is checked against what the one before left (`seen`), so one may not
  // overtake another on the way.
  let lastSent = Promise.resolve();
  function send(path, body) {
    const sent = lastSent.then(() => post(path, body));
    lastSent = sent.catch(() => {});
    return sent;
  }

  // A tile or class row carries its state in data-state and in a state-* class.
  function setState(element, state) {
    element.classList.remove("state-" + element.dataset.state);
    element.dataset.state = state;
    element.classList.add("state-" + state);
    const badge = element.querySelector(".badge");
    if (badge) badge.textContent = state;
    showOn(element);
  }

  // A record view's class row shows whether the class is on, and what its key will do.
  function showOn(row) {
    const box = row.querySelector("input.on");
    if (!box) return;
    const on = row.dataset.state === "accept" || row.dataset.state === "add"
      || (row.dataset.state === "pending" && row.dataset.labelled === "1");
    box.checked = on;
    row.querySelector(".does").textContent = on ? "turn off: reject"
      : "turn on: " + (row.dataset.labelled === "1" ? "accept" : "add");
  }

  function decisionFor(element, yes) {
    if (!yes) return "reject";
    return element.dataset.labelled === "1" ? "accept" : "add";
  }

  const itemKey = (recordId, labelKey) => recordId + "\n" + labelKey;

  // Send decisions for elements; on success update them. Each is on the undo stack from
  // the moment it is sent, so "u" straight after "r" undoes that reject even while its
  // answer is still on the way (not the decision before it). Each says what the curator
  // saw (`seen`): if another tab or curator decided the item meanwhile, nothing is saved,
  // and the elements show what stands now, for the curator to decide again on it. While an
  // element's own decision is on its way, the next one on it was made on that decision
  // (`expected`), not on the state the element still shows.
  async function decide(elements, yesOrNo, base) {
    const name = reviewer();
    if (!name || elements.length === 0) return false;
    const decisions = elements.map((element, i) => ({
      record_id: element.dataset.record,
      model_version: base.version || element.dataset.version,
      label_key: element.dataset.label,
      decision: decisionFor(element, yesOrNo[i]),
      reviewer: name,
      audit: base.audit,
      seen: element.dataset.expected || element.dataset.state,
    }));
    const previous = elements.map((element) => element.dataset.state);
    elements.forEach((element, i) => { element.dataset.expected = decisions[i].decision; });
    sending += 1;
    const entry = {
      sent: send("/api/decisions", { decisions: decisions }), elements, previous, reviewer: name, audit: base.audit,
    };
    undoStack.push(entry);
    updateUndo();
    try {
      entry.answer = await entry.sent;
      elements.forEach((element, i) => setState(element, decisions[i].decision));
      toast(decisions.length === 1 ? decisions[0].decision + "ed " + decisions[0].label_key
        : decisions.length + " decisions saved");
      return true;
    } catch (error) {
      const at = undoStack.indexOf(entry);
      if (at !== -1) undoStack.splice(at, 1);
      updateUndo();
      const conflicts = (error.answer && error.answer.conflicts) || [];
      conflicts.forEach((now) => elements.filter((element) => itemKey(element.dataset.record,
        element.dataset.label) === itemKey(now.record_id, now.label_key))
        .forEach((element) => setState(element, now.decision || "pending")));
      toast(conflicts.length === 0 ? "Not saved: " + error.message
        : "Not saved: decided meanwhile elsewhere (" + conflicts.map((now) => now.label_key + " "
          + (now.decision ? now.decision + " by " + now.reviewer : "pending again")).join(", ")
          + "). Shown as it stands now: decide again to change it.");
      return false;
    } finally {
      sending -= 1;
      answered += 1;
      elements.forEach((element, i) => {
        if (element.dataset.expected === decisions[i].decision) delete element.dataset.expected;
      });
    }
  }

  // Ask the server what stands now on these tiles or rows and show it (on an audit page, the
  // audit decisions); returns those that changed. A read that a decision of this page
  // overtook (sent or answered meanwhile) is dropped: the decision's own answer is newer.
  async function restate(elements, audit) {
    const records = Array.from(new Set(elements.map((element) => element.dataset.record)));
    const before = answered;
    if (records.length === 0 || sending > 0) return [];
    let now;
    try {
      const query = records.map((id) => "record=" + encodeURIComponent(id)).join("&")
        + (audit ? "&audit=1" : "");
      const response = await fetch("/api/decisions?" + query, { credentials: "same-origin" });
      if (response.status === 401) loseLogin();  // a tab shown again after a log out elsewhere
      if (!response.ok) return [];
      now = await response.json();
    } catch (error) {
      return []; // the page stays as it was; a decision made on it is still checked
    }
    if (sending > 0 || answered !== before) return [];
    const standing = new Map(now.decisions.map((d) => [itemKey(d.record_id, d.label_key), d.decision]));
    return elements.filter((element) => {
      const state = standing.get(itemKey(element.dataset.record, element.dataset.label)) || "pending";
      if (state === element.dataset.state) return false;
      setState(element, state);
      return true;
    });
  }

  function toastChanged(changed) {
    if (changed.length === 0) return;
    toast(changed.length === 1 ? "1 item was decided elsewhere meanwhile: shown as it stands now"
      : changed.length + " items were decided elsewhere meanwhile: shown as they stand now");
  }

  // Waits for the last decision's answer (its continuation in decide runs first, as it
  // awaited first), then takes it back.
  async function undoLast() {
    const last = undoStack.pop();
    updateUndo();
    if (!last) return;
    let answer;
    try {
      answer = await last.sent;
    } catch (error) {
      return; // never saved, so nothing to take back; decide has said so
    }
    try {
      await send("/api/undo", { ids: answer.ids, reviewer: last.reviewer });
      last.elements.forEach((element, i) => setState(element, last.previous[i]));
      // What was before may have changed meanwhile (another tab): show what stands now.
      await restate(last.elements, last.audit);
      toast(last.elements.length ? "Undone" : "Undone (on the page before)");
      hooks.afterUndo(last.elements);
      hooks.afterChange();
    } catch (error) {
      undoStack.push(last);
      updateUndo();
      toast("Undo failed: " + error.message);
    }
  }

  function updateUndo() {
    const button = document.getElementById("undo");
    if (button) button.disabled = undoStack.length === 0;
  }

  function typing(event) {
    const tag = event.target.tagName;
    return (tag === "INPUT" && event.target.type !== "checkbox") || tag === "SELECT" || tag === "TEXTAREA" || event.ctrlKey || event.metaKey || event.altKey;
  }

  // An image the app could not show says why (the app answers "image unavailable: REASON").
  function markMissing(img) {
    const failed = async () => {
      if (img.classList.contains("missing")) return;
      img.classList.add("missing");
      const note = document.createElement("p");
      note.className = "unavailable";
      note.textContent = "image unavailable";
      img.after(note);
      try {
        const answer = await fetch(img.currentSrc || img.src, { credentials: "same-origin" });
        const text = (await answer.text()).trim();
        if (text.startsWith("image unavailable")) note.textContent = text;
      } catch (error) { /* the short note stays */ }
    };
    img.addEventListener("error", failed);
    if (img.complete && img.naturalWidth === 0 && img.currentSrc) failed();
  }

  function grid(list) {
    const tiles = Array.from(list.querySelectorAll(".tile"));
    const audit = list.dataset.audit === "1";
    // A page of pending items turns itself once all are decided; a page of decided ones
    // (state=reviewed, say) is for changing them, and stays.
    const toDo = tiles.some((tile) => tile.dataset.state === "pending");
    const selected = new Set();
    let focus = 0;
    let anchor = null;

    sessionStorage.setItem(QUEUE_KEY, location.pathname + location.search);
    sessionStorage.setItem(RECORDS_KEY, JSON.stringify(
      Array.from(new Set(tiles.map((tile) => tile.dataset.recordUrl)))));

    // Set once this page has sent the browser on: the answers to decisions still on their way
    // (a quick reviewer's last keys) must not send it again.
    let leaving = false;
    // The decisions of the page that turned itself to this one stay undoable here.
    const carried = JSON.parse(sessionStorage.getItem(CARRIED_KEY) || "[]");
    sessionStorage.removeItem(CARRIED_KEY);
    carried.forEach((entry) => undoStack.push({
      sent: Promise.resolve({ ids: entry.ids }), elements: [], previous: [], reviewer: entry.reviewer,
    }));
    updateUndo();

    // The counts from the server, and (with `turn`) on to the next page once this one has
    // nothing pending.
    async function refreshProgress(turn = true) {
      const box = document.getElementById("progress");
      const before = answered;
      let now = null;
      try {
        const response = await fetch("/api/progress?" + box.dataset.query, { credentials: "same-origin" });
        if (response.ok) now = await response.json();
      } catch (error) { /* the counts stay as they were; the decisions are stored */ }
      // Counts read before a decision answered meanwhile are older than it: that decision
      // refreshes them itself.
      if (answered !== before) return;
      if (now) {
        document.getElementById("pending").textContent = now.pending + (now.pending_capped ? "+" : "");
        document.getElementById("decided-today").textContent = now.decided_today;
      }
      const open = tiles.some((tile) => tile.dataset.state === "pending" || tile.dataset.busy);
      if (!turn || !toDo || open || leaving) return;
      const onward = list.dataset.next || (now && now.pending > 0 ? list.dataset.first : "");
      if (!onward) { toast("Nothing left to review with these filters"); return; }
      leaving = true;
      sessionStorage.setItem(CARRIED_KEY, JSON.stringify(undoStack.filter((entry) => entry.answer)
        .map((entry) => ({ ids: entry.answer.ids, reviewer: entry.reviewer }))));
      location.href = onward;
    }
    hooks.afterChange = refreshProgress;
    hooks.afterUndo = (elements) => { const at = tiles.indexOf(elements[0]); if (at !== -1) setFocus(at); };
    // Back from another tab: the tiles and counts as they stand now. A tile decided elsewhere
    // leaves the selection, so that "accept selected" cannot overturn what the curator has
    // not looked at; the page stays, for the curator to see what changed.
    hooks.onReturn = async () => {
      const changed = await restate(tiles.filter((tile) => !tile.dataset.busy), audit);
      changed.forEach((tile) => selected.delete(tile));
      refreshSelection();
      toastChanged(changed);
      await refreshProgress(false);
    };

    function setFocus(index) {
      if (tiles.length === 0) return;
      focus = Math.max(0, Math.min(tiles.length - 1, index));
      tiles.forEach((tile) => tile.classList.remove("focused"));
      tiles[focus].classList.add("focused");
      tiles[focus].scrollIntoView({ block: "nearest" });
    }

    function refreshSelection() {
      tiles.forEach((tile) => tile.classList.toggle("selected", selected.has(tile)));
      const count = selected.size;
      document.getElementById("selected-count").textContent = count ? count + " selected" : "";
      document.getElementById("accept-selected").disabled = count === 0;
      document.getElementById("reject-selected").disabled = count === 0;
    }

    function toggle(tile) {
      if (selected.has(tile)) selected.delete(tile); else selected.add(tile);
      refreshSelection();
    }

    function targets() {
      return selected.size ? tiles.filter((tile) => selected.has(tile)) : [tiles[focus]];
    }

    // Focus moves on at once, so that a quick reviewer's next key is for the next tile
    // even while this decision is on its way.
    async function act(yes) {
      const chosen = targets().filter(Boolean);
      if (chosen.length === 0 || !reviewer()) return;
      // How many of this page's decisions on the tile are on their way: the first answer
      // must not mark it done while a second (a changed mind) is still out.
      chosen.forEach((tile) => { tile.dataset.busy = Number(tile.dataset.busy || 0) + 1; });
      selected.clear();
      refreshSelection();
      const after = tiles.indexOf(chosen[chosen.length - 1]);
      const next = tiles.findIndex((tile, i) => i > after && tile.dataset.state === "pending"
        && !tile.dataset.busy);
      setFocus(next === -1 ? after : next);
      const seen = chosen.map((tile) => tile.dataset.state);
      const saved = await decide(chosen, chosen.map(() => yes), { audit: audit });
      chosen.forEach((tile) => {
        if (Number(tile.dataset.busy) > 1) tile.dataset.busy -= 1; else delete tile.dataset.busy;
      });
      if (saved) { hooks.afterChange(); return; }
      // Some were decided meanwhile (they show it now): the others stay selected, to decide
      // again with one key.
      const unchanged = chosen.filter((tile, i) => tile.dataset.state === seen[i]);
      if (unchanged.length < chosen.length) {
        if (chosen.length > 1) unchanged.forEach((tile) => selected.add(tile));
        refreshSelection();
        refreshProgress(false);
      }
    }

    tiles.forEach((tile, index) => {
      tile.addEventListener("click", (event) => {
        if (event.shiftKey && anchor !== null) {
          const [from, to] = [Math.min(anchor, index), Math.max(anchor, index)];
          tiles.slice(from, to + 1).forEach((t) => selected.add(t));
          refreshSelection();
        } else {
          toggle(tile);
          anchor = index;
        }
        setFocus(index);
      });
      tile.addEventListener("dblclick", () => { location.href = tile.dataset.recordUrl; });
      markMissing(tile.querySelector("img"));
    });

    document.getElementById("accept-selected").addEventListener("click", () => act(true));
    document.getElementById("reject-selected").addEventListener("click", () => act(false));
    // "Select all" is all still to decide where some are: a decision made on this page (or
    // on its way) is not overturned by "select all, accept the rest". On a page of decided
    // items, all.
    function selectAll() {
      const pending = tiles.filter((tile) => tile.dataset.state === "pending" && !tile.dataset.busy);
      (pending.length ? pending : tiles).forEach((tile) => selected.add(tile));
      refreshSelection();
    }
    document.getElementById("select-all").addEventListener("click", selectAll);
    document.getElementById("undo").addEventListener("click", undoLast);

    document.addEventListener("keydown", (event) => {
      if (typing(event)) return;
      const key = event.key;
      if (key === "j" || key === "ArrowRight") setFocus(focus + 1);
      else if (key === "k" || key === "ArrowLeft") setFocus(focus - 1);
      else if (key === "a") act(true);
      else if (key === "r") act(false);
      else if (key === "x" || key === " ") toggle(tiles[focus]);
      else if (key === "*") selectAll();
      else if (key === "Escape") { selected.clear(); refreshSelection(); }
      else if (key === "u") undoLast();
      else if (key === "Enter" && tiles[focus]) location.href = tiles[focus].dataset.recordUrl;
      else return;
      event.preventDefault();
    });
    setFocus(0);
  }

  function record(article) {
    const rows = Array.from(article.querySelectorAll(".class-row"));
    const base = {
      version: article.dataset.version,
      audit: article.dataset.audit === "1",
    };
    const positive = (row) => row.dataset.state === "accept" || row.dataset.state === "add"
      || (row.dataset.state === "pending" && row.dataset.labelled === "1");

    function step(offset) {
      const records = JSON.parse(sessionStorage.getItem(RECORDS_KEY) || "[]");
      // Compared as the browser writes addresses: the page's links leave an id's "'" as it
      // is, where the address bar holds it as %27.
      const address = (url) => { const parsed = new URL(url, location.href); parsed.hash = ""; return parsed.href; };
      const here = records.map(address).indexOf(address(location.href));
      const target = records[here + offset];
      if (here === -1 || !target) { toast("No " + (offset > 0 ? "next" : "previous") + " record in the queue"); return; }
      location.href = target;
    }
    const labelled = () => rows.filter((row) => row.dataset.labelled === "1");
    rows.forEach((row) => {
      const box = row.querySelector("input.on");
      box.addEventListener("click", (event) => {
        event.preventDefault(); // the box shows the stored state, once the decision is saved
        decide([row], [!positive(row)], base);
      });
    });

    document.getElementById("accept-labels").addEventListener("click", () => {
      const todo = labelled().filter((row) => row.dataset.state !== "accept");
      decide(todo, todo.map(() => true), base);
    });
    document.getElementById("reject-labels").addEventListener("click", () => {
      const todo = labelled().filter((row) => row.dataset.state !== "reject");
      decide(todo, todo.map(() => false), base);
    });
    document.getElementById("undo").addEventListener("click", undoLast);
    document.getElementById("next-record").addEventListener("click", (e) => { e.preventDefault(); step(1); });
    document.getElementById("prev-record").addEventListener("click", (e) => { e.preventDefault(); step(-1); });
    const back = sessionStorage.getItem(QUEUE_KEY);
    if (back) document.getElementById("back").href = back;
    hooks.onReturn = async () => toastChanged(await restate(rows, base.audit));
    markMissing(article.querySelector("figure img"));

    document.addEventListener("keydown", (event) => {
      if (typing(event)) return;
      const key = event.key;
      if (/^[1-9]$/.test(key) && rows[Number(key) - 1]) {
        const row = rows[Number(key) - 1];
        decide([row], [!positive(row)], base);
      } else if (key === "a") document.getElementById("accept-labels").click();
      else if (key === "r") document.getElementById("reject-labels").click();
      else if (key === "n") step(1);
      else if (key === "p") step(-1);
      else if (key === "u") undoLast();
      else if (key === "Escape") location.href = document.getElementById("back").href;
      else return;
      event.preventDefault();
    });
  }

  // The recent decisions of the reviewer this browser remembers, each one undoable.
  function recent(section) {
    const name = localStorage.getItem(REVIEWER_KEY) || "";
    if (!section.dataset.reviewer && name) {
      location.replace("/recent?reviewer=" + encodeURIComponent(name));
      return;
    }
    section.querySelectorAll(".take-back").forEach((button) => {
      button.addEventListener("click", async () => {
        const row = button.closest("tr");
        // The take-back is the curator's at the keys (the name in the box), who may be
        // looking at another curator's list: never the name the list is of.
        const name = reviewer();
        if (!name) return;
        try {
          await post("/api/undo", { ids: [Number(row.dataset.id)], reviewer: name });
          row.classList.add("taken-back");
          button.replaceWith("taken back");
          toast("Undone");
        } catch (error) {
          toast("Undo failed: " + error.message);
        }
      });
    });
  }

  // A page the browser shows again from its back/forward cache would show the decisions as
  // they were when it was left: load it again, as it is stored now.
  window.addEventListener("pageshow", (event) => { if (event.persisted) location.reload(); });

  // A page shown again (its tab chosen, its window focused) asks what stands now on its
  // items: the decisions made meanwhile in another tab, or by another curator, show before
  // the curator acts on the page. One ask at a time.
  let returning = null;
  function shownAgain() {
    if (document.visibilityState !== "visible" || returning) return;
    returning = hooks.onReturn().finally(() => { returning = null; });
  }
  document.addEventListener("visibilitychange", shownAgain);
  window.addEventListener("focus", shownAgain);

  document.addEventListener("DOMContentLoaded", () => {
    const input = document.getElementById("reviewer");
    input.value = localStorage.getItem(REVIEWER_KEY) || "";
    input.addEventListener("change", () => localStorage.setItem(REVIEWER_KEY, input.value.trim()));
    // Enter confirms the name and gives the keys back to the page: the next "a" is a decision.
    input.addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault();
      localStorage.setItem(REVIEWER_KEY, input.value.trim());
      input.blur();
      if (input.value.trim()) toast("Reviewing as " + input.value.trim());
    });
    const list = document.getElementById("grid");
    if (list) grid(list);
    const article = document.getElementById("record");
    if (article) record(article);
    const section = document.getElementById("recent");
    if (section) recent(section);
    // An error page met away from the queue (a record) leads back to the queue it came from.
    const wayBack = document.getElementById("way-back");
    const remembered = sessionStorage.getItem(QUEUE_KEY);
    if (wayBack && wayBack.dataset.remembered && remembered) wayBack.href = remembered;
  });
})();
