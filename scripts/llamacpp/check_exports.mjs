// Loads GGUF files in a real llama.cpp (the prebuilt CPU library of node-llama-cpp, pinned by run_checks.sh) and
// reports, per file, as one JSON line: the warnings llama.cpp logged while loading, whether it tokenizes the test
// texts to the same ids as the reference file and detokenizes them back to the same text, the mean negative
// log-likelihood of a fixed token sequence (perplexity = exp of it), and the greedy continuation of a prompt.
//
//   node check_exports.mjs SPEC.json
//
// SPEC.json: {"reference": FILE.gguf, "files": [FILE.gguf, ...], "texts": [STRING, ...], "ppl_text": STRING,
//             "prompt": STRING, "greedy_tokens": N}
// The scored sequence is the reference file's tokens of ppl_text (BOS first when the file asks for it), the same
// ids for every file; the greedy prompt is tokenized by each file (BOS likewise).
// Run from the folder where node-llama-cpp is installed (NODE_PATH works too).
import { getLlama, LlamaLogLevel } from "node-llama-cpp";
import fs from "node:fs";

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
let logs = [];
const llama = await getLlama({
    gpu: false,
    build: "never",
    logLevel: LlamaLogLevel.warn,
    logger: (level, message) => {
        if (level === LlamaLogLevel.warn || level === LlamaLogLevel.error) logs.push(message.trim());
    },
});

/// `text`'s ids, with BOS first when the model's metadata asks for it.
function withBos(model, text) {
    const ids = Array.from(model.tokenize(text, false));
    return model.tokens.shouldPrependBosToken && model.tokens.bos !== null ? [model.tokens.bos, ...ids] : ids;
}

async function measure(path, ids) {
    const start = Date.now();
    logs = [];
    const model = await llama.loadModel({ modelPath: path });
    const loadWarnings = logs.filter((l) => l.length > 0);
    const tokenized = spec.texts.map((t) => Array.from(model.tokenize(t, false)));
    const detokenized = tokenized.map((ids) => model.detokenize(ids, false));
    ids ??= withBos(model, spec.ppl_text);
    // One thread: on a shared machine llama.cpp's spinning worker threads slow it down by orders of magnitude.
    const context = await model.createContext({ contextSize: Math.max(512, ids.length + spec.greedy_tokens + 64), threads: 1 });
    const seq = context.getSequence();
    console.error(`${path}: loaded in ${((Date.now() - start) / 1000).toFixed(1)}s`);
    // −log p(next) from each position's full logits (log-sum-exp in f64). In windows of 16 positions, so that
    // the per-position logit maps of a 262k-token vocabulary are not all alive at once. (node-llama-cpp's
    // filtered `logits` output does not give the same values; the full map does, matching qlora-rt.)
    let nll = 0;
    for (let from = 0; from < ids.length; from += 16) {
        const window = ids.slice(from, from + 16);
        const items = window.map((t, j) => (from + j + 1 < ids.length ? [t, { generateNext: { logits: true } }] : t));
        const out = await seq.controlledEvaluate(items);
        for (let j = 0; j < window.length && from + j + 1 < ids.length; j++) {
            const logits = out[j].next.logits;
            let max = -Infinity;
            for (const v of logits.values()) max = Math.max(max, v);
            let sum = 0;
            for (const v of logits.values()) sum += Math.exp(v - max);
            nll -= logits.get(ids[from + j + 1]) - max - Math.log(sum);
        }
    }
    nll /= ids.length - 1;
    console.error(`${path}: scored in ${((Date.now() - start) / 1000).toFixed(1)}s`);
    await seq.clearHistory();
    const prompt = withBos(model, spec.prompt);
    // Greedy decoding, one token per evaluation: argmax of the logits (temperature 0).
    const greedy = [];
    const pick = { generateNext: { token: true, options: { temperature: 0 } } };
    let input = prompt.map((t, i) => (i + 1 < prompt.length ? t : [t, pick]));
    while (greedy.length < spec.greedy_tokens) {
        const res = await seq.controlledEvaluate(input);
        const token = res[input.length - 1].next.token;
        greedy.push(token);
        input = [[token, pick]];
    }
    const greedyText = model.detokenize(greedy, false);
    await context.dispose();
    await model.dispose();
    return { loadWarnings, tokenized, detokenized, ids, nll, greedy, greedyText };
}

const ref = await measure(spec.reference);
for (const file of [spec.reference, ...spec.files]) {
    const m = file === spec.reference ? ref : await measure(file, ref.ids);
    console.log(JSON.stringify({
        file,
        load_warnings: m.loadWarnings,
        same_tokens: m.tokenized.every((ids, i) => JSON.stringify(ids) === JSON.stringify(ref.tokenized[i])),
        round_trip: m.detokenized.every((t, i) => t === ref.detokenized[i]),
        nll: m.nll,
        greedy: m.greedy,
        greedy_text: m.greedyText,
        ids: file === spec.reference ? m.ids : undefined,
    }));
}
