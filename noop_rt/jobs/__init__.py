"""Jobs over loaded classifiers: batch (in process or on Ray Data), eval, bench, and the benchmarks' accuracy
protocols. May import: noop_rt.api, noop_rt.runtime, noop_rt.demo; never noop_rt.train or noop_rt.build."""
