"""``dfmkit eval digits`` and ``dfmkit eval fid``; :func:`add_eval_arguments` fills the ``eval`` subparser."""

from __future__ import annotations

import argparse
import json


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``digits`` and ``fid`` actions to the ``eval`` subparser; both run :func:`cmd_eval`."""
    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION", required=True)

    digits = actions.add_parser(
        "digits", help="prompt adherence of digits-quickstart samples (a classifier reads each digit)",
        description="Classify each generated NNN.png with a scikit-learn digit classifier (images are "
                    "downsampled to 8x8 by area averaging) and compare with the digit its NNN.json prompt "
                    "'a handwritten digit K' asked for: accuracy per requested digit and overall. An image that "
                    "shows no digit (blank or nearly constant) counts as wrong and is listed.",
    )
    digits.add_argument("--samples", required=True, metavar="DIR", help="folder of NNN.png with NNN.json sidecars")
    digits.add_argument("--skip-other-prompts", action="store_true",
                        help="skip (and list) samples whose prompt is not 'a handwritten digit K' instead of failing")
    digits.add_argument("--json", action="store_true", help="print the report as JSON")
    digits.add_argument("--grid", metavar="PNG",
                        help="also write a picture of the samples: a column per digit, misread ones framed red")

    fid = actions.add_parser(
        "fid", help="FID between a folder of generated images and a reference folder",
        description="Frechet distance between Gaussian fits of image features. Uses the standard FID "
                    "Inception-v3 when its weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) are "
                    "given or found in torch hub's cache; otherwise a fixed random-weight conv network whose "
                    "values are comparable only with each other, not with published FIDs.",
    )
    fid.add_argument("--samples", required=True, metavar="DIR", help="folder of generated images")
    fid.add_argument("--reference", required=True, metavar="DIR",
                     help="folder of reference images, or 'sklearn:digits' for the digits data rendered at "
                          "the samples' size")
    fid.add_argument("--inception-weights", metavar="PATH",
                     help="FID Inception state dict (else $DFMKIT_INCEPTION_WEIGHTS, else torch hub's cache)")
    fid.add_argument("--feature-net", choices=("auto", "inception", "random-conv"), default="auto",
                     help="auto (default): Inception when its weights are found, else random-conv")
    fid.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (32)")
    fid.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "digits":
        from dfmkit.eval.digits import evaluate_digits

        report = evaluate_digits(args.samples, skip_other_prompts=args.skip_other_prompts)
        if args.grid:
            from dfmkit.eval.digits import write_digit_grid

            write_digit_grid(report, args.grid)
    else:
        from dfmkit.eval.fid import compute_fid

        report = compute_fid(args.samples, args.reference, inception_weights=args.inception_weights,
                             feature_net=args.feature_net, batch_size=args.batch_size)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    return 0
