// A tenfold task worker in Node.js (20+), speaking the HTTP worker protocol
// (docs/tasks-worker-protocol.md). No npm dependencies: Node's global fetch only.
//
//   TENFOLD_URL=http://127.0.0.1:8000 TENFOLD_API_KEY=tf_... \
//   TASK_TYPES=node.reverse,node.fail node examples/node-worker/worker.mjs
//
// Environment:
//   TENFOLD_URL       the tenfold server (default http://127.0.0.1:8000)
//   TENFOLD_API_KEY   an API key holding the tasks:write scope (required)
//   TASK_TYPES        comma-separated task types to claim (default: every handler below)
//   TASK_QUEUES       comma-separated queues (default: default)
//   CONCURRENCY       tasks run at once (default 4)
//   LEASE_SECONDS     lease asked for on claim and on each heartbeat (default 60)
//   WAIT_SECONDS      long-poll time of one claim (default 20, at most 30)
//   WORKER_ID         this worker's name (default node-<host>-<pid>)
//
// SIGTERM or SIGINT: stop claiming, finish the tasks in hand, report them, exit 0.

import os from "node:os";
import { setTimeout as sleep } from "node:timers/promises";

// --- handlers: task type -> async (payload, ctx) => result ---------------------------------

class NonRetryable extends Error {
  // Thrown by a handler: the task fails at once, without its remaining retries.
  constructor(message) {
    super(message);
    this.name = "NonRetryable";
    this.retryable = false;
  }
}

const handlers = {
  "node.reverse": async (payload) => {
    if (typeof payload?.text !== "string") {
      throw new NonRetryable("payload.text must be a string");
    }
    return { text: [...payload.text].reverse().join(""), by: "node" };
  },
  "node.fail": async (payload) => {
    throw new NonRetryable(payload?.message ?? "node.fail always fails");
  },
  "node.sleep": async (payload, ctx) => {
    // Sleeps payload.ms, stopping early when the task is cancelled or its lease is lost.
    await sleep(payload?.ms ?? 1000, undefined, { signal: ctx.signal }).catch(() => {});
    ctx.signal.throwIfAborted();
    return { slept: payload?.ms ?? 1000 };
  },
};

// --- configuration -------------------------------------------------------------------------

const env = process.env;
function list(value, fallback) {
  const items = (value ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  return items.length ? items : fallback;
}

const config = {
  url: (env.TENFOLD_URL ?? "http://127.0.0.1:8000").replace(/\/+$/, ""),
  key: env.TENFOLD_API_KEY ?? "",
  taskTypes: list(env.TASK_TYPES, Object.keys(handlers)),
  queues: list(env.TASK_QUEUES, ["default"]),
  concurrency: Math.max(1, Number(env.CONCURRENCY ?? 4)),
  leaseSeconds: Math.max(1, Number(env.LEASE_SECONDS ?? 60)),
  waitSeconds: Math.min(30, Math.max(0, Number(env.WAIT_SECONDS ?? 20))),
  workerId: env.WORKER_ID ?? `node-${os.hostname()}-${process.pid}`,
};

const unknown = config.taskTypes.filter((t) => !(t in handlers));
if (!config.key) fatal("TENFOLD_API_KEY is not set (a key with the tasks:write scope)");
if (unknown.length) fatal(`no handler for task type(s): ${unknown.join(", ")}`);

function log(event, fields = {}) {
  console.log(JSON.stringify({ ts: new Date().toISOString(), event, worker_id: config.workerId, ...fields }));
}

function fatal(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

// --- HTTP ----------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, problem) {
    super(`${status} ${problem?.type ?? ""}: ${problem?.detail ?? ""}`);
    this.status = status;
    this.problem = problem;
  }
}

async function call(path, body, signal) {
  const response = await fetch(config.url + path, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${config.key}` },
    body: JSON.stringify(body),
    signal,
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (!response.ok) throw new HttpError(response.status, data);
  return data;
}

const isLeaseLost = (err) => err instanceof HttpError && err.status === 409;
const isFinal = (err) =>
  err instanceof HttpError && err.status >= 400 && err.status < 500 && err.status !== 429;

// Report a result, retrying transport errors and 5xx while the lease may still hold.
async function report(kind, task, body) {
  const deadline = Date.parse(task.lease_expires_at);
  for (let delay = 200; ; delay = Math.min(delay * 2, 5000)) {
    try {
      return await call(`/api/v1/tasks/${task.task_id}/${kind}`, {
        lease_token: task.lease_token,
        worker_id: config.workerId,
        ...body,
      });
    } catch (err) {
      if (isLeaseLost(err)) {
        log("lease_lost", { task_id: task.task_id, on: kind });
        return null;
      }
      if (isFinal(err) || Date.now() > deadline) {
        log("report_failed", { task_id: task.task_id, on: kind, error: String(err) });
        return null;
      }
      await sleep(delay);
    }
  }
}

// --- running one task ----------------------------------------------------------------------

const running = new Map(); // task_id -> { task, abort }

async function run(task) {
  const abort = new AbortController();
  running.set(task.task_id, { task, abort });
  const beat = setInterval(() => heartbeat(task, abort), (config.leaseSeconds * 1000) / 3);
  const started = Date.now();
  log("running", { task_id: task.task_id, task_type: task.task_type, attempt: task.attempt });
  try {
    const handler = handlers[task.task_type];
    const result = await Promise.race([
      handler(task.payload, { taskId: task.task_id, attempt: task.attempt, signal: abort.signal }),
      sleep(task.timeout_seconds * 1000, undefined, { signal: abort.signal, ref: false }).then(
        () => {
          throw new Error(`timed out after ${task.timeout_seconds} s`);
        },
        () => {
          throw abort.signal.reason ?? new Error("aborted");
        },
      ),
    ]);
    clearInterval(beat);
    if (abort.signal.aborted && abort.signal.reason?.leaseLost) return;
    const ms = Date.now() - started;
    await report("complete", task, { result: result ?? null });
    log("completed", { task_id: task.task_id, task_type: task.task_type, ms });
  } catch (err) {
    clearInterval(beat);
    if (abort.signal.reason?.leaseLost) return; // someone else owns the task now: say nothing
    const error = `${err?.name ?? "Error"}: ${err?.message ?? String(err)}`.slice(0, 10_000);
    const out = await report("fail", task, {
      error,
      retryable: err?.retryable !== false && !abort.signal.reason?.cancelled,
      traceback: err?.stack ? String(err.stack).slice(0, 50_000) : null,
    });
    log("failed", { task_id: task.task_id, task_type: task.task_type, error, now: out?.status });
  } finally {
    clearInterval(beat);
    abort.abort(); // ends the timeout timer
    running.delete(task.task_id);
  }
}

async function heartbeat(task, abort) {
  try {
    const out = await call(`/api/v1/tasks/${task.task_id}/heartbeat`, {
      lease_token: task.lease_token,
      lease_seconds: config.leaseSeconds,
      worker_id: config.workerId,
    });
    task.lease_expires_at = out.lease_expires_at;
    if (out.cancel_requested && !abort.signal.aborted) {
      log("cancel_requested", { task_id: task.task_id });
      const reason = new Error("cancelled");
      reason.cancelled = true;
      abort.abort(reason);
    }
  } catch (err) {
    if (isLeaseLost(err) && !abort.signal.aborted) {
      const reason = new Error("lease lost");
      reason.leaseLost = true;
      abort.abort(reason);
    }
    // transport errors: try again at the next beat; the lease has slack for two misses
  }
}

// --- the claim loop ------------------------------------------------------------------------

let stopping = false;
const pollAbort = new AbortController();

function stop(signal) {
  if (stopping) return;
  stopping = true;
  log("stopping", { signal, in_hand: running.size });
  // End a pending long-poll. The server hands back what it claimed for it if it notices the
  // disconnect; a response already on its way is lost, and its tasks return when their leases
  // expire (LEASE_SECONDS), like those of a crashed worker.
  pollAbort.abort();
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));

async function main() {
  log("started", { url: config.url, task_types: config.taskTypes, queues: config.queues });
  let backoff = 200;
  while (!stopping) {
    const free = config.concurrency - running.size;
    if (free <= 0) {
      await Promise.race([...running.values()].map((r) => r.done));
      continue;
    }
    let claimed;
    try {
      claimed = await call(
        "/api/v1/workers/claim",
        {
          worker_id: config.workerId,
          task_types: config.taskTypes,
          queues: config.queues,
          max_tasks: free,
          wait_seconds: config.waitSeconds,
          lease_seconds: config.leaseSeconds,
        },
        pollAbort.signal,
      );
      backoff = 200;
    } catch (err) {
      if (stopping) break;
      if (isFinal(err)) fatal(`claim refused: ${err.message}`);
      log("claim_failed", { error: String(err), retry_in_ms: backoff });
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 5000);
      continue;
    }
    for (const task of claimed.tasks) {
      const done = run(task); // registers itself in `running` before its first await
      running.get(task.task_id).done = done;
    }
  }
  await Promise.allSettled([...running.values()].map((r) => r.done));
  log("stopped");
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
