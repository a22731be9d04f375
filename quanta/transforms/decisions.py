"""Where `prepare` and `convert` record what they decided per module (read by `coverage`), so that
`coverage` imports neither."""

#: attribute of a prepared model's root: module name -> the reason it was or was not quantized
DECISIONS_ATTR = "_quanta_decisions"
#: prefix of a decision for a layer whose shape its config cannot take (it stays float)
UNSUPPORTED = "unsupported: "
#: attribute of a converted model's root: the conversion report (one `Lowering` per layer)
REPORT_ATTR = "_quanta_convert_report"
