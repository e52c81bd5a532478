// Imports a `tracer --chrome-trace` file with speedscope's own importer and checks what it
// sees against what the traced program did. Run by bench/viewers.sh.
//
// Usage: node speedscope_import.cjs MODULES_DIR FILE EXPECT_JSON
//   MODULES_DIR  a node_modules holding `speedscope` (the released package) and `jsdom`
//   EXPECT_JSON  {"profiles": [{"add": 3}, ...]}   calls per thread (any order), or
//                {"profiles": "from-file"}          per-thread counts taken from FILE itself
//                (a killed run: how many calls it wrote is not known beforehand);
//                optional "nested": {"outer>add": 2}  parent>child call counts
//
// speedscope 1.25 ships only a browser bundle. Its importers live in one module that the
// bundle registers through esbuild's export helper (Object.defineProperty with the export
// names as keys); the bundle runs in a jsdom window whose defineProperty notes the object
// that gets `importProfileGroupFromText`. That is the function the web app calls on a
// dropped or opened file, so the file goes through the same path as in the browser
// (format detection, JSON parse with the missing `]` allowed, trace-event import).
// The UI part of the bundle (canvas, WebGL) does not run here.
'use strict';
const fs = require('fs');
const path = require('path');

const [modulesArg, file, expectText] = process.argv.slice(2);
const modulesDir = modulesArg && path.resolve(modulesArg);
if (!modulesArg || !file || !expectText) {
    console.error('usage: node speedscope_import.cjs MODULES_DIR FILE EXPECT_JSON');
    process.exit(2);
}
const expect = JSON.parse(expectText);
// An error inside the minified bundle would otherwise print whole lines of it.
process.on('unhandledRejection', (e) => {
    console.log(`FAIL: speedscope's bundle failed while loading: ${String(e && e.message).slice(0, 200)}`);
    process.exit(1);
});
const failures = [];
const fail = (msg) => failures.push(msg);

async function loadSpeedscope() {
    const { JSDOM } = require(path.join(modulesDir, 'jsdom'));
    const pkgDir = path.join(modulesDir, 'speedscope');
    const version = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'))).version;
    const releaseDir = path.join(pkgDir, 'dist', 'release');
    const bundle = fs.readdirSync(releaseDir).find((f) => /^speedscope-.*\.js$/.test(f));
    if (!bundle) throw new Error(`no speedscope-*.js bundle in ${releaseDir}`);
    const dom = new JSDOM('<!DOCTYPE html><body></body>', {
        url: 'http://localhost/',
        runScripts: 'outside-only',
        pretendToBeVisual: true,
    });
    const win = dom.window;
    // Older jsdom releases (the ones that run on node 18) lack these browser globals.
    for (const name of ['TextDecoder', 'TextEncoder']) if (!win[name]) win[name] = globalThis[name];
    let importers = null;
    const defineProperty = win.Object.defineProperty;
    win.Object.defineProperty = function (obj, key, desc) {
        if (key === 'importProfileGroupFromText') importers = obj;
        return defineProperty.call(this, obj, key, desc);
    };
    // The app's UI setup throws in jsdom (no matchMedia, canvas or WebGL) after the
    // importer module is registered; only the importer is used.
    const log = console.log;
    console.log = () => {};
    try {
        win.eval(fs.readFileSync(path.join(releaseDir, bundle), 'utf8'));
    } catch (e) {
        // expected: the UI part
    }
    // The bundle initialises the importer module in a promise job queued at load.
    await new Promise((resolve) => setTimeout(resolve, 0));
    console.log = log;
    if (!importers) throw new Error(`speedscope ${version}: importProfileGroupFromText not found in ${bundle}`);
    return { version, bundle, importers };
}

// The trace-event format's rules for the events tracer writes, checked on the raw text:
// an array of objects, `X` with numeric ts/dur >= 0, `i` with ts and a scope, `M` naming
// processes and threads.
function checkFormat(text) {
    const trimmed = text.trimEnd();
    if (!trimmed.startsWith('[')) fail('format: the file does not start with [');
    const terminated = trimmed.endsWith(']');
    let events = [];
    try {
        events = JSON.parse(terminated ? trimmed : trimmed.replace(/,\s*$/, '') + ']');
    } catch (e) {
        fail(`format: not a JSON array of events (${e.message})`);
    }
    const byThread = new Map();
    for (const [i, ev] of events.entries()) {
        const where = `format: event ${i}`;
        if (!Number.isInteger(ev.pid) || !Number.isInteger(ev.tid)) fail(`${where}: pid/tid not integers`);
        if (typeof ev.name !== 'string' || ev.name === '') fail(`${where}: no name`);
        if (ev.ph === 'X') {
            if (!(typeof ev.ts === 'number' && ev.ts >= 0)) fail(`${where}: ts ${ev.ts}`);
            if (!(typeof ev.dur === 'number' && ev.dur >= 0)) fail(`${where}: dur ${ev.dur}`);
            const key = `${ev.pid}/${ev.tid}`;
            if (!byThread.has(key)) byThread.set(key, []);
            byThread.get(key).push(ev);
        } else if (ev.ph === 'M') {
            if (!['process_name', 'thread_name'].includes(ev.name)) fail(`${where}: metadata ${ev.name}`);
            if (typeof (ev.args && ev.args.name) !== 'string') fail(`${where}: metadata without args.name`);
        } else if (ev.ph === 'i') {
            // a call probed at entry only
            if (!(typeof ev.ts === 'number' && ev.ts >= 0)) fail(`${where}: ts ${ev.ts}`);
            if (!['t', 'p', 'g'].includes(ev.s)) fail(`${where}: instant scope ${ev.s}`);
        } else {
            fail(`${where}: phase ${ev.ph} (tracer writes X, i and M only)`);
        }
    }
    return { events, terminated, byThread };
}

// What speedscope built: per profile, calls by function name (speedscope names a frame
// `NAME {ARGS JSON}`), time per name, and parent>child pairs.
function describeProfile(profile) {
    const calls = {};
    const time = {};
    const nested = {};
    const stack = [];
    const addFrames = [];
    let maxDepth = 0;
    const base = (frame) => frame.name.replace(/ \{.*$/s, '');
    profile.forEachCall(
        (node, value) => {
            const name = base(node.frame);
            calls[name] = (calls[name] || 0) + 1;
            if (name === 'add') addFrames.push(node.frame.name);
            if (stack.length) {
                const pair = `${stack[stack.length - 1].name}>${name}`;
                nested[pair] = (nested[pair] || 0) + 1;
            }
            stack.push({ name, start: value });
            maxDepth = Math.max(maxDepth, stack.length);
        },
        (node, value) => {
            const top = stack.pop();
            time[top.name] = (time[top.name] || 0) + (value - top.start);
        },
    );
    const frames = [];
    profile.forEachFrame((f) => frames.push(f.name));
    return { name: profile.getName(), unit: profile.getWeightUnit(), total: profile.getTotalWeight(), calls, time, nested, maxDepth, frames, addFrames };
}

const sortedKey = (o) => JSON.stringify(Object.keys(o).sort().map((k) => [k, o[k]]));

async function main() {
    const text = fs.readFileSync(file, 'utf8');
    const format = checkFormat(text);
    const xCount = format.events.filter((e) => e.ph === 'X').length;
    console.log(`${path.basename(file)}: ${text.length} bytes, ${format.events.length} events (${xCount} X), closing ] ${format.terminated ? 'present' : 'missing'}`);

    const ss = await loadSpeedscope();
    const group = await ss.importers.importProfileGroupFromText(path.basename(file), text);
    if (!group) {
        fail(`speedscope ${ss.version} did not recognise the file (importProfileGroupFromText returned null)`);
        return;
    }
    console.log(`speedscope ${ss.version} (${ss.bundle}): ${group.profiles.length} profiles`);
    const seen = group.profiles.map(describeProfile);
    for (const p of seen) {
        const calls = Object.entries(p.calls).map(([n, c]) => `${n} x${c}`).join(', ');
        const nested = Object.entries(p.nested).map(([n, c]) => `${n} x${c}`).join(', ');
        console.log(`  profile "${p.name}": ${calls}; depth ${p.maxDepth}${nested ? `; nested ${nested}` : ''}; total weight ${p.total.toFixed(3)} ${p.unit}; ${p.frames.length} distinct frame(s)`);
        console.log(`    e.g. frame ${JSON.stringify(p.frames[0])}`);
    }

    // Calls per thread: from the program's known calls, or (killed run) from the file.
    let want = expect.profiles;
    if (want === 'from-file') {
        want = [...format.byThread.values()].map((evs) => {
            const c = {};
            for (const e of evs) c[e.name] = (c[e.name] || 0) + 1;
            return c;
        });
    }
    const got = seen.map((p) => sortedKey(p.calls)).sort();
    const exp = want.map(sortedKey).sort();
    if (JSON.stringify(got) !== JSON.stringify(exp)) fail(`calls per thread: speedscope has ${got.join(' ')}, expected ${exp.join(' ')}`);
    // The arguments reach the viewer: speedscope's frame for each call of calls.c's
    // add(a, b) shows the return value a + b.
    let adds = 0;
    for (const p of seen) {
        for (const name of p.addFrames) {
            const m = /^add (\{.*\})$/s.exec(name);
            const a = m && JSON.parse(m[1]);
            const ab = a && /^a=(-?\d+), b=(-?\d+)$/.exec(a.args);
            if (!ab || a.return !== String(Number(ab[1]) + Number(ab[2]))) fail(`add frame ${JSON.stringify(name)}: not add(a, b) = a + b`);
            adds++;
        }
    }
    console.log(`  ${adds} add frames show add(a, b) = a + b`);
    if (expect.nested) {
        const nested = {};
        for (const p of seen) for (const [k, v] of Object.entries(p.nested)) nested[k] = (nested[k] || 0) + v;
        if (sortedKey(nested) !== sortedKey(expect.nested)) fail(`nesting: speedscope has ${JSON.stringify(nested)}, expected ${JSON.stringify(expect.nested)}`);
    }
    // Time per function: speedscope's open/close values against the file's durations.
    const fileTime = {};
    for (const e of format.events) if (e.ph === 'X') fileTime[e.name] = (fileTime[e.name] || 0) + e.dur;
    const ssTime = {};
    for (const p of seen) for (const [k, v] of Object.entries(p.time)) ssTime[k] = (ssTime[k] || 0) + v;
    for (const [name, us] of Object.entries(fileTime)) {
        const diff = Math.abs((ssTime[name] || 0) - us);
        if (diff > 1e-6 * Math.max(1, us)) fail(`time in ${name}: speedscope ${ssTime[name]} us, file ${us} us`);
    }
    console.log(`  time per function matches the file's durations: ${Object.entries(ssTime).map(([n, t]) => `${n} ${t.toFixed(3)} us`).join(', ')}`);
}

main()
    .catch((e) => fail(`import failed: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}`))
    .finally(() => {
        for (const f of failures) console.log(`FAIL: ${f}`);
        console.log(failures.length ? `${path.basename(file)}: FAILED` : `${path.basename(file)}: ok`);
        process.exit(failures.length ? 1 : 0);
    });
