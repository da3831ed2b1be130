// The TypeScript SDK (@anthropic-ai/sdk) against a real budgeter: run by
// tests/system/test_real_clients.py with `node`, NODE_PATH pointing at the installed SDK.
//
// env: BUDGETER_URL (budgeter api base URL), TENANT_KEY (a tenant key), MODEL.
// argv: the steps to run (default: all). Prints one JSON object per step on stdout
// ({"step": ..., "ok": true, ...} or {"step": ..., "ok": false, "status", "error"}) and
// exits 1 when any step failed, so the test can name what broke.
"use strict";

const Anthropic = require("@anthropic-ai/sdk");

const client = new Anthropic({
  baseURL: process.env.BUDGETER_URL,
  apiKey: process.env.TENANT_KEY,
  maxRetries: 0,
  timeout: 60_000,
});
const model = process.env.MODEL || "claude-sonnet-4-6";
const question = (text) => [{ role: "user", content: text }];

function report(step, fields) {
  process.stdout.write(JSON.stringify({ step, ...fields }) + "\n");
}

async function sleep(ms) {
  await new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitEnded(id) {
  for (let i = 0; i < 1200; i++) {
    const batch = await client.messages.batches.retrieve(id);
    if (batch.processing_status === "ended") return batch;
    await sleep(100);
  }
  throw new Error(`batch ${id} did not end`);
}

const steps = {
  async create() {
    const message = await client.messages.create({
      model,
      max_tokens: 64,
      messages: question("ts sdk: create"),
    });
    return { type: message.type, text: message.content[0].text, usage: message.usage };
  },
  async stream() {
    const stream = client.messages.stream({
      model,
      max_tokens: 64,
      messages: question("ts sdk: stream"),
    });
    let streamed = "";
    stream.on("text", (text) => {
      streamed += text;
    });
    const final = await stream.finalMessage();
    return { streamed, text: final.content[0].text, stop_reason: final.stop_reason };
  },
  async count_tokens() {
    const counted = await client.messages.countTokens({
      model,
      system: "be brief",
      messages: question("ts sdk: count tokens"),
    });
    return { input_tokens: counted.input_tokens };
  },
  async beta_create() {
    const message = await client.beta.messages.create({
      model,
      max_tokens: 64,
      messages: question("ts sdk: beta create"),
      context_management: { edits: [{ type: "clear_tool_uses_20250919" }] },
      betas: ["context-management-2025-06-27"],
    });
    return { type: message.type, text: message.content[0].text };
  },
  async models_list() {
    const ids = [];
    for await (const model of client.models.list({ limit: 2 })) {
      ids.push(model.id);
      if (ids.length >= 10) break;
    }
    return { ids };
  },
  async batches() {
    const requests = [0, 1, 2].map((i) => ({
      custom_id: `ts-${i}`,
      params: { model, max_tokens: 32, messages: question(`ts sdk: batch ${i}`) },
    }));
    const created = await client.messages.batches.create({ requests });
    const ended = await waitEnded(created.id);
    const results = [];
    for await (const entry of await client.messages.batches.results(created.id)) {
      results.push({ custom_id: entry.custom_id, type: entry.result.type });
    }
    const second = await client.messages.batches.create({ requests });
    const canceled = await client.messages.batches.cancel(second.id);
    const secondEnded = await waitEnded(second.id);
    const deleted = await client.messages.batches.delete(created.id);
    const deletedSecond = await client.messages.batches.delete(second.id);
    return {
      created_status: created.processing_status,
      counts: ended.request_counts,
      results,
      cancel_status: canceled.processing_status,
      canceled_counts: secondEnded.request_counts,
      deleted: [deleted.type, deletedSecond.type],
    };
  },
};

async function main() {
  const only = process.argv.slice(2);
  for (const [name, step] of Object.entries(steps)) {
    if (only.length && !only.includes(name)) continue;
    try {
      report(name, { ok: true, ...(await step()) });
    } catch (error) {
      const status = error && error.status;
      report(name, { ok: false, status, error: String((error && error.message) || error) });
      process.exitCode = 1;
    }
  }
}

main();
