"""Pure tensor math of the consolidation methods (no I/O, no models loaded): testable on hand-built tensors."""
