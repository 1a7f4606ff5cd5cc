"""``inferd bench``: a load generator for any OpenAI-compatible, TEI or Cohere endpoint.

A client only: nothing here imports inferd's engines, ``inferd.api`` or torch, so it can load a
server on another machine (or another server altogether) from a small install. Modules:

- ``prompts`` — the built-in prompts and passages, ``--prompts`` / ``--texts`` files, cold markers;
- ``load`` — one asyncio loop, C workers per level pulling request numbers from a queue, the
  incremental SSE parser; every request becomes one JSON-ready sample;
- ``stats`` — every figure, computed from the samples alone (so a report re-renders exactly);
- ``report`` — the JSON report and the rich table.
"""

REPORT_FORMAT = "inferd-bench/1"
