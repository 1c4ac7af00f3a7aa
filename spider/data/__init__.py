"""Where rows come from (sources) and where results go (sinks)."""
