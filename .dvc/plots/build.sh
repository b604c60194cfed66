#!/bin/sh
# Rebuilds offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so that `dvc plots show` and
# `dvc plots diff` draw their charts with no network (DVC's own page loads them from a CDN). .dvc/config names it
# (plots.html_template). The page has no {scripts} placeholder, so DVC's CDN script tags are left out.
# Needs npm once (the registry, not a CDN); run from the repository root: sh .dvc/plots/build.sh
set -eu
VEGA=5.33.1 VEGA_LITE=5.23.0 VEGA_EMBED=6.29.0  # the majors DVC's templates are written for (vega-lite v5)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --no-save --no-package-lock "vega@$VEGA" "vega-lite@$VEGA_LITE" \
    "vega-embed@$VEGA_EMBED")
out=.dvc/plots/offline.html
{
    printf '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>DVC Plot</title>\n'
    printf '<!-- vega %s, vega-lite %s, vega-embed %s (BSD-3-Clause: LICENSE-vega.txt), inlined by build.sh -->\n' \
        "$VEGA" "$VEGA_LITE" "$VEGA_EMBED"
    for library in vega/build/vega.min.js vega-lite/build/vega-lite.min.js vega-embed/build/vega-embed.min.js; do
        printf '<script>\n'
        cat "$work/node_modules/$library"
        printf '\n</script>\n'
    done
    printf '<style>\ntable { border-spacing: 15px; }\n</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'
} > "$out.tmp"
mv "$out.tmp" "$out"
cp "$work/node_modules/vega-lite/LICENSE" .dvc/plots/LICENSE-vega.txt
echo "wrote $out ($(wc -c < "$out") bytes)"
