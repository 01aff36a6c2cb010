// Validates schemas/asyncapi.yaml with the AsyncAPI project's own parser (the spec's JSON
// Schema plus its rules): exit 0 when the document has no error, 1 with the errors otherwise.
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Parser } from "@asyncapi/parser";

const here = dirname(fileURLToPath(import.meta.url));
const file = process.argv[2] ?? resolve(here, "../../schemas/asyncapi.yaml");
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"));
const errors = diagnostics.filter((d) => d.severity === 0);
for (const d of diagnostics) {
  const level = ["error", "warning", "info", "hint"][d.severity];
  console.log(`${level}: ${d.code}: ${d.message} at ${d.path.join(".")}`);
}
if (errors.length || !document) process.exit(1);
console.log(`valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ${document.operations().length} operations`);
