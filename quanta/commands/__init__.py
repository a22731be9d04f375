"""What the `quanta` subcommands do, one typed function each (`quanta.cli` only parses arguments).

`quantize_file` (quantize), `dump_preset` (config dump), `bench` (bench), `export_file` (export),
`compare_file` / `report_file` (compare, report), `supported.text` (supported). Where models and
data come from: `sources` (specs, tensor files), `exported` (``torch.export`` ``.pt2`` programs),
`images` (folders of images). `CommandError` is a failure the command line reports as one line on stderr (exit status 1).
"""

from .errors import CommandError

__all__ = ["CommandError"]
