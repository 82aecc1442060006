"""The rewriting compiler: the canonical view, the pattern registry and `Match`, the matcher, the
rewriter, the passes that drive them, graph-boundary reports, the report itself and the
compression pass.  Never names a specific pattern; imports graph/ and compress/ below it."""
