// Validates Istio resources against Istio's CRD schemas, as packaged by
// @kubernetes-models/istio (generated from the CRDs' OpenAPI schemas).
// Input on stdin: a JSON array of Kubernetes objects. Output: one line per
// object, `ok <apiVersion> <kind> <name>` or `invalid ...: <reason>`; the
// exit status is 1 if any object is invalid or of an Istio kind this
// package does not know (fail closed), 2 on bad input.
// Used by tests/tests/manifests.rs; run from target/tools/k8s.
import { readFileSync } from "node:fs";

let docs;
try {
  docs = JSON.parse(readFileSync(0, "utf8"));
} catch (e) {
  console.error(`bad input: ${e.message}`);
  process.exit(2);
}
if (!Array.isArray(docs)) {
  console.error("bad input: expected a JSON array of objects");
  process.exit(2);
}

let failed = false;
for (const doc of docs) {
  const apiVersion = String(doc?.apiVersion ?? "");
  const kind = String(doc?.kind ?? "");
  const name = String(doc?.metadata?.name ?? "?");
  const [group, version] = apiVersion.split("/");
  let model;
  try {
    const mod = await import(`@kubernetes-models/istio/${group}/${version}`);
    model = mod[kind];
  } catch {
    model = undefined;
  }
  if (typeof model !== "function") {
    console.log(`invalid ${apiVersion} ${kind} ${name}: no schema for this kind`);
    failed = true;
    continue;
  }
  try {
    new model(doc).validate();
    console.log(`ok ${apiVersion} ${kind} ${name}`);
  } catch (e) {
    console.log(`invalid ${apiVersion} ${kind} ${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
