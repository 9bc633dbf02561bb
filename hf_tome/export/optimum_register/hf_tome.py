"""``optimum-cli export hf-tome``: the same export as ``hf-tome export``, registered with Optimum's command line.

Installed as ``optimum.commands.register.hf_tome`` (pyproject maps this folder there): ``optimum-cli`` imports every
module of that namespace package and registers its ``REGISTER_COMMANDS``. Only the options are imported here, so
``optimum-cli --help`` stays fast; the export itself loads on ``run``.

    optimum-cli export hf-tome onnx --model PATH [--tome-r 16 | --tome-budget 0.6] OUT/
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand

from hf_tome.export.options import add_export_arguments, options_from_args


class HfToMeExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hf-tome", help="Export a token-merged model (hf-tome: ToMe, prune + merge, DC-ViT) "
                          "to ONNX in Optimum's layout, with a dynamic batch axis.")

    @staticmethod
    def parse_args(parser) -> None:
        add_export_arguments(parser)

    def run(self) -> None:
        from hf_tome.export.onnx import run_export

        status = run_export(options_from_args(self.args))
        if status:
            raise SystemExit(status)


REGISTER_COMMANDS = [(HfToMeExportCommand, ExportCommand)]
