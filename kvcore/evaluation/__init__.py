"""Evaluation of compressed KV caches: every number computed once, the same way.

Modules, each importing only those listed before it:

    options    the evaluator's options; which protocols fit which family
    timing     device-synchronised timers
    windows    the HF guide's sliding windows, kvpress's chunks, shards of windows
    nll        next-token NLL of scored tokens, pooling, paired per-window differences
    attention  kvcore's attention function (per-head masks, attention statistics)
    cache      caches over given tensors, the compressing (fake-quant) cache layers, RoPE
               undo/redo, gathering kept tokens
    prefill    one prefill of a context serving every scorer (kvzip's reconstruction pass)
    context    THE context-compression path: quantize / evict under the method's budget
               scope / prune a prefilled context (perplexity, tasks and the compress job)
    records    compression-error and size recorders, the ppl/{method}.json record
    protocols  fake-quant and prefill-compress over windows
    perplexity shards of a method's windows, their merge, the workflow's perplexity jobs
    extracted  the eviction compress job: keep masks for an extracted run
    stored     a run's or a compressed file's cache loaded back as a DynamicCache (load_cache)
    generation a method inside your own model() / generate(): compressed_cache, apply
    score      a given continuation's NLL after a given prompt, with and without a method

kvcore.tasks, benchmarks and the CLI use the public names; nothing imports an
underscore name across modules (tests/test_imports.py checks it).
"""
