"""`enrich harvest`: a multilabel training set from the Search API, one query per concept."""

from __future__ import annotations

from pathlib import Path

import click

from enrichment.cli.base import (
    emit_json,
    image_source_option,
    progress_option,
    reusability_option,
    settings,
)
from enrichment.sources.harvest import DEFAULT_CONCEPT_QUERY, DEFAULT_PER_CLASS

DATA = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option(
    "--vocabulary",
    type=DATA,
    default=None,
    help="{key: concept URI} JSON; default: the shipped 20-class vocabulary.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory of the set; run again with the same options to continue.",
)
@click.option(
    "--per-class",
    type=click.IntRange(min=1),
    default=DEFAULT_PER_CLASS,
    show_default=True,
    help="At most this many records per concept.",
)
@reusability_option
@click.option("--qf", multiple=True, help="Extra Search API filter, e.g. COUNTRY:france.")
@image_source_option
@click.option(
    "--concept-query",
    default=DEFAULT_CONCEPT_QUERY,
    show_default=True,
    help="The filter for one concept; {uri} is its concept URI.",
)
@click.option(
    "--exclude",
    "exclude_files",
    type=DATA,
    multiple=True,
    help="Record ids to leave out (CSV with an id column, or one id a line). Repeatable.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the selection.")
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def harvest(
    vocabulary: Path | None,
    out: Path,
    per_class: int,
    reusability: tuple[str, ...],
    qf: tuple[str, ...],
    image_source: str,
    concept_query: str,
    exclude_files: tuple[Path, ...],
    seed: int,
    progress: bool,
    as_json: bool,
) -> None:
    """Harvest a labelled image set for VOCABULARY's concepts into OUT.

    One cursor-paged Search API query per concept (TYPE:IMAGE, media=true);
    a record found for several concepts is one row with all their labels.
    Writes OUT/labels.csv (what `enrich model train --data` reads: image,
    labels, group = the record's dataset, europeana_id, provider, rights),
    OUT/images/ (one file per distinct image) and OUT/summary.json.
    Interrupted, it continues where it stopped when run again.
    """
    from enrichment.media.fetch import Fetcher
    from enrichment.model.harvest import (
        HarvestDir,
        OtherOptions,
        download_images,
        summary_table,
        write_set,
    )
    from enrichment.model.labelled import DEFAULT_VOCABULARY, read_vocabulary
    from enrichment.sources.europeana import SearchClient
    from enrichment.sources.harvest import HarvestOptions, collect, read_exclusions, select

    config = settings()
    vocabulary_path = (vocabulary or DEFAULT_VOCABULARY).resolve()
    terms = read_vocabulary(vocabulary_path)
    options = HarvestOptions(
        per_class=per_class,
        reusability=reusability,
        qf=qf,
        image_source=image_source,
        concept_query=concept_query,
        exclude=read_exclusions(exclude_files),
        seed=seed,
    )
    client = SearchClient(config)
    directory = HarvestDir(out)
    show = progress and not as_json

    def make() -> dict:
        from tqdm import tqdm

        with tqdm(
            total=len(terms), desc="concepts", unit=" queries", disable=None if show else True
        ) as bar:
            collected = collect(client, terms, options, lambda key, found: bar.update())
        for key, (examined, usable) in collected.cut_short.items():
            click.echo(
                f"warning: {key}: stopped paging after {examined:,} results, only {usable:,} "
                "of them usable (why the others were left out: records.left_out in summary.json)",
                err=True,
            )
        chosen = select(collected.candidates.values(), options.per_class, options.seed)
        return {
            "candidates": len(collected.candidates),
            "found": collected.found,
            "left_out": collected.left_out,
            "records": [candidate.as_json(list(terms)) for candidate in chosen],
        }

    with directory.writing():
        try:
            plan = directory.plan({"options": options.as_json(), "vocabulary": terms}, make)
        except OtherOptions as error:  # a usage error (exit 2); a damaged selection stays 1
            raise click.BadParameter(str(error), param_hint="'--out'") from None
        # Left on Ctrl-C at once: the downloads under way are cancelled (fetched again on
        # the next start), and the journal keeps those done.
        with Fetcher(config) as fetcher:
            downloads = download_images(
                directory, plan["records"], fetcher, config.max_image_pixels, show
            )
        summary = write_set(directory, plan, downloads, list(terms))
    if as_json:
        emit_json(summary)
        return
    click.echo(f"harvested into {out}: labels.csv, images/, summary.json")
    for line in summary_table(summary):
        click.echo(line)
