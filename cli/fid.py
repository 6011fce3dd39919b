"""`restune-sd fid`: FID (and KID) of generated images against a folder, COCO2017 val or saved statistics."""

import json
from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def fid(
    generated: Annotated[Path, typer.Argument(help="folder of generated images (png/jpg/jpeg/webp, all one size) or a .npz of their statistics")],
    reference: Annotated[str, typer.Argument(help="folder of reference images, coco:ROOT (the images of ROOT/val2017) or a .npz of statistics (written by --save-stats, or pytorch-fid's mu/sigma)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="also compute KID (100 subsets of min(1000, n) images)")] = False,
    save_stats: Annotated[Path | None, typer.Option(help="write the reference's statistics to this new .npz, to reuse as REFERENCE (with --kid it keeps the features KID needs)")] = None,
    inception_weights: Annotated[Path | None, typer.Option(help="local copy of pt_inception-2015-12-05-6726825d.pth (default: torch-fidelity downloads it)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per Inception batch (1 to 1024)")] = 50,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")] = None,
    resolution: Annotated[int | None, typer.Option(help="size reference images are brought to (default: the generated images' size)")] = None,
    resize: Annotated[str, typer.Option(help="how images reach Inception's 299x299: legacy-tensorflow (bilinear inside the network, as torch-fidelity and the original TF FID) or clean (PIL bicubic first, as clean-fid)")] = "legacy-tensorflow",
):
    """FID of GENERATED against REFERENCE on torch-fidelity's Inception-v3 (2048-d pool features).

    The protocol, to report with the figure (FID falls as the number of images grows):
    - images: every image in GENERATED (all one size) against every reference image; both counts are printed.
    - resolution: reference images are brought to --resolution, by default the generated images' size.
    - reference resize: bicubic resize of the shorter side, then a centre crop (torch-fidelity itself does not resize).
    - to 299x299: legacy-tensorflow lets Inception resize both sides (bilinear, no antialiasing, TF1-exact as in
      torch-fidelity; pytorch-fid uses torch's bilinear); clean resizes with PIL bicubic first, as clean-fid does.
    - COCO2017 val has 5,000 images, so FID against coco:ROOT is FID-5k unless captions repeat.
    - a pytorch-fid .npz holds no image count; it shows as unknown. Statistics written by --save-stats record the
      image size and resize mode they were made with, and are refused at another.
    """
    from restune_sd.evaluation.fid import StatisticsNotSaved, compute_fid

    try:
        result = compute_fid(generated, reference, kid=kid, inception_weights=inception_weights, device=device,
                             batch_size=batch_size, save_stats=save_stats, resolution=resolution,
                             resize=resize)
    except StatisticsNotSaved as error:  # the figures took minutes: print them, then the error
        show(error.result, as_json, kid)
        raise
    show(result, as_json, kid)
    if save_stats is not None and not as_json:
        typer.echo(f"reference statistics saved to {save_stats}")


def show(result: dict, as_json: bool, kid: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, allow_nan=False))
        return
    generated, reference = (_count(result[key]) for key in ("num_generated", "num_reference"))
    typer.echo(f"FID {result['fid']:.4f}  ({generated} generated vs {reference} reference images)")
    if kid:
        typer.echo(f"KID {result['kid_mean']:.6f} ± {result['kid_std']:.6f}")


def _count(number: int | None) -> str:
    return "an unknown number of" if number is None else f"{number:,}"
