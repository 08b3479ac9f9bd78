"""Small shared helpers (wire formats, checksums, files)."""
