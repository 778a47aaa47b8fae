"""The inference engine: libllama through llama-cpp-python's low-level bindings."""
