"""One subpackage per method, each on the shared machinery below; no method imports another."""
