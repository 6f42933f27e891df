"""Everything that knows about device meshes and process groups; model-agnostic."""
