"""Mobile export: edge-rt's model -> ExecuTorch (.pte) or ONNX bundles, and running/verifying them.

    exporter.export_bundle(model, out, format=, quant=, max_seq=)   the bundle (docs/EXPORT.md)
    runtime.load_bundle(path) -> LLM, runtime.verify_bundle(path)    run / check it
    bundle.open_bundle(path)                                         manifest + sha256 checks
    module.ExportLM, static_cache.StaticKVCache                      what is exported

Heavy dependencies (executorch, torchao, onnx, onnxruntime, onnxscript) are imported lazily.
"""
