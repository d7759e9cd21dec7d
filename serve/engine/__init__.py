"""The continuously batched decode loop (see ARCHITECTURE.md, "The engine")."""
