"""The continuously batched decode loop (the README's "How the engine works")."""
