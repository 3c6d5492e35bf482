#!/usr/bin/env bash
# Refresh the vendored uPlot from its npm package: plugins/console/static/vendor/update.sh 1.6.32
#
# A maintainer runs this by hand, never a test or the server. It fetches the
# package's tarball with npm, checks it against the integrity the registry
# publishes, copies the files the console loads at run time, and rewrites the
# uPlot section of README.md (version, integrity, and each file's sha256, which
# tests/test_console_assets.py checks). Review and commit the result.
set -euo pipefail

version="${1:?usage: $0 VERSION (the uplot npm version, e.g. 1.6.32)}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "uplot@$version" >/dev/null
tarball="uplot-$version.tgz"
published="$(npm view "uplot@$version" dist.integrity)"
actual="sha512-$(node -e 'process.stdout.write(require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tarball")"
if [ "$published" != "$actual" ]; then
    echo "the tarball's integrity $actual is not the registry's $published" >&2
    exit 1
fi
license="$(npm view "uplot@$version" license)"
tar xzf "$tarball"

# vendor file <- file in the package
files=(
    "uPlot.iife.min.js:package/dist/uPlot.iife.min.js"
    "uPlot.min.css:package/dist/uPlot.min.css"
    "uPlot.LICENSE:package/LICENSE"
)
listing=""
for pair in "${files[@]}"; do
    target="${pair%%:*}" source="${pair#*:}"
    cp "$source" "$here/$target"
    listing+="  - \`$target\`, from \`${source#package/}\`, sha256 \`$(sha256sum "$here/$target" | cut -d' ' -f1)\`"$'\n'
done

section="$work/section.md"
cat >"$section" <<SECTION
<!-- uplot:begin (written by update.sh) -->
## uPlot

The console's charts.

- Package: \`uplot\` on npm (https://www.npmjs.com/package/uplot), source https://github.com/leeoniya/uPlot
- Version: $version
- Tarball: https://registry.npmjs.org/uplot/-/uplot-$version.tgz
- Integrity: $published
- License: $license (\`uPlot.LICENSE\`)
- Files:
$listing<!-- uplot:end -->
SECTION

awk -v section="$section" '
    /^<!-- uplot:begin/ { while ((getline line < section) > 0) print line; skipping = 1; next }
    /^<!-- uplot:end/   { skipping = 0; next }
    !skipping
' "$here/README.md" >"$work/README.md"
cp "$work/README.md" "$here/README.md"
echo "uPlot $version vendored in $here"
