// The blind rating page: one item at a time (caption, reference, A and B), one row of A / tie / B per question.
// Answers go to the server one at a time; the rater's id stays in this browser (localStorage), so a reload or a
// server restart resumes at the first item not fully answered.
"use strict";

const $ = (id) => document.getElementById(id);
const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/;
const CHOICES = [["A", "A"], ["tie", "tie"], ["B", "B"]];
let rater = null;
let state = null;
let position = 0; // which of the rater's items is shown
let row = 0; // which question the keys answer
let queue = Promise.resolve(); // the votes not yet sent, in order
let unsaved = 0;

function answersOf(item) {
  return state.answers[item.id] || {};
}

function complete(item) {
  const given = answersOf(item);
  return state.criteria.every((c) => c.name in given);
}

function nextOpen(from) {
  for (let k = 0; k < state.items.length; k++) {
    const n = (from + k) % state.items.length;
    if (!complete(state.items[n])) return n;
  }
  return state.items.length; // all answered
}

function showOnly(id) {
  for (const section of ["login", "item", "done"]) $(section).hidden = section !== id;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function renderProgress() {
  const done = state.items.filter(complete).length;
  const total = state.items.length;
  $("bar").style.width = total ? `${(100 * done) / total}%` : "0%";
  $("count").textContent = `${done} of ${total} rated`;
  $("who").textContent = `rater: ${rater}`;
}

function renderItem() {
  const item = state.items[position];
  const given = answersOf(item);
  $("caption").textContent = item.caption;
  $("img-ref").src = `/img/${item.reference}`;
  $("img-a").src = `/img/${item.a}`;
  $("img-b").src = `/img/${item.b}`;
  const rows = state.criteria.map((criterion, n) => {
    const line = document.createElement("div");
    line.className = n === row ? "question current" : "question";
    const label = document.createElement("span");
    label.textContent = criterion.question;
    line.append(label);
    for (const [value, text] of CHOICES) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = text;
      button.dataset.criterion = criterion.name;
      button.dataset.answer = value;
      button.className = given[criterion.name] === value ? "chosen" : "";
      button.addEventListener("click", () => answer(n, value));
      line.append(button);
    }
    return line;
  });
  $("criteria").replaceChildren(...rows);
  $("count").dataset.item = `${position + 1}`;
}

function render() {
  renderProgress();
  if (position >= state.items.length) {
    showOnly("done");
    return;
  }
  showOnly("item");
  renderItem();
}

// An answer shows at once and the keys move on; the votes go to the server one after another, in order, and an
// answer the server refused is taken back with the reason shown.
function answer(n, value) {
  const item = state.items[position];
  const criterion = state.criteria[n].name;
  const previous = answersOf(item)[criterion];
  state.answers[item.id] = { ...answersOf(item), [criterion]: value };
  const open = state.criteria.findIndex((c, k) => k > n && !(c.name in state.answers[item.id]));
  if (open >= 0) {
    row = open;
  } else if (complete(item)) {
    position = nextOpen(position + 1);
    row = 0;
  } else {
    row = state.criteria.findIndex((c) => !(c.name in state.answers[item.id]));
  }
  render();
  unsaved += 1;
  renderSaving();
  queue = queue.then(() => send(item, criterion, value, previous));
}

async function send(item, criterion, value, previous) {
  const response = await fetch("/api/vote", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.token },
    body: JSON.stringify({ rater, item: item.id, criterion, answer: value }),
  }).catch(() => null);
  unsaved -= 1;
  if (response && response.ok) {
    renderSaving();
    return;
  }
  const body = response ? await response.json().catch(() => ({})) : {};
  const given = { ...answersOf(item) };
  if (previous === undefined) delete given[criterion];
  else given[criterion] = previous;
  state.answers[item.id] = given;
  showError(`Not saved: ${body.error || (response ? response.status : "the server did not answer")}`);
  renderSaving();
  render();
}

function renderSaving() {
  $("saving").textContent = unsaved ? `saving ${unsaved}...` : "all answers saved";
}

function move(step) {
  position = Math.min(Math.max(position + step, 0), state.items.length - 1);
  row = 0;
  render();
}

const KEYS = { a: "A", 1: "A", ArrowLeft: "A", b: "B", 2: "B", ArrowRight: "B", t: "tie", 0: "tie" };

function onKey(event) {
  if (!state || event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  if (position >= state.items.length) return;
  if (event.key in KEYS) {
    answer(row, KEYS[event.key]);
  } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    row = (row + (event.key === "ArrowDown" ? 1 : state.criteria.length - 1)) % state.criteria.length;
    renderItem();
  } else if (event.key === "n" || event.key === "p") {
    move(event.key === "n" ? 1 : -1);
  } else {
    return;
  }
  event.preventDefault();
}

async function load() {
  const response = await fetch(`/api/state?rater=${encodeURIComponent(rater)}`);
  if (!response.ok) {
    showError(`Could not load the items (${response.status}): is the server running?`);
    return;
  }
  state = await response.json();
  renderSaving();
  position = nextOpen(0);
  row = position < state.items.length ? Math.max(0, state.criteria.findIndex((c) => !(c.name in answersOf(state.items[position])))) : 0;
  render();
}

function askForId() {
  state = null;
  showOnly("login");
  $("rater").focus();
}

function start() {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("rater").value.trim();
    if (!ID_PATTERN.test(id)) {
      showError("A rater id is 1-32 letters, digits, '.', '_' or '-'.");
      return;
    }
    showError("");
    localStorage.setItem("rater", id);
    rater = id;
    load();
  });
  $("previous").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  $("review").addEventListener("click", () => {
    position = 0;
    render();
  });
  $("switch").addEventListener("click", () => {
    localStorage.removeItem("rater");
    askForId();
  });
  document.addEventListener("keydown", onKey);
  window.addEventListener("beforeunload", (event) => {
    if (unsaved) event.preventDefault(); // the browser asks before leaving with answers not yet saved
  });
  rater = localStorage.getItem("rater");
  if (rater && ID_PATTERN.test(rater)) load();
  else askForId();
}

start();
