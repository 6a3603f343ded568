#!/usr/bin/env bash
# hangar's demo, as a user would drive it: start hangar on its embedded PostgreSQL, train a
# tiny RTMDet on a synthetic COCO dataset through the HTTP API, then run a tiled detection on a
# new image larger than one 1280 px patch, and print what was found.
# The job policies are WASI components: the demo pushes and activates the retry policy and the
# detection cleanup hook (built from plugins/) on the running server, as an operator would.
# Run through `make demo`, which builds hangar and the plugins and installs the MMDetection
# environment first.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
hangar=${HANGAR_BIN:-$repo/target/debug/hangar}
python=$repo/.hangar/mmdet-venv/bin/python
demo=$repo/.hangar/demo
epochs=${DEMO_EPOCHS:-20}
images=${DEMO_IMAGES:-64}

say() { printf '\n== %s\n' "$*"; }
json() { "$python" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

rm -rf "$demo"
mkdir -p "$demo"

say "Generating a synthetic COCO dataset ($images images, 2 classes) and a 1800x1500 scene"
"$python" python/hangar_mmdet/make_synthetic_coco.py --out "$demo/dataset" --images "$images" --seed 0
"$python" python/hangar_mmdet/make_synthetic_coco.py --big-image "$demo/scene.png" --seed 7

say "Starting hangar (embedded PostgreSQL under .hangar/pg)"
HANGAR_HTTP_LISTEN=127.0.0.1:0 "$hangar" serve >"$demo/hangar.out" 2>"$demo/hangar.log" &
server=$!
stop_server() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap stop_server EXIT
for _ in $(seq 1 600); do
  grep -q 'listening on' "$demo/hangar.out" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$demo/hangar.log" >&2; echo "hangar did not start" >&2; exit 1; }
  sleep 0.1
done
url=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$demo/hangar.out" | head -n1)
echo "hangar is at $url (log: $demo/hangar.log)"

token=$("$hangar" token create --name "demo-$(date +%s)" --claim runs:read --claim runs:write --claim jobs:read)
echo "API token: $token"
api() {
  local method=$1 path=$2
  shift 2
  curl -sS --fail-with-body -X "$method" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' "$url$path" "$@"
}
wait_run() { # kind id -> final run JSON
  local kind=$1 id=$2 run status last=""
  while true; do
    run=$(api GET "/v1/$kind/$id")
    status=$(json "d['status']" <<<"$run")
    if [ "$status" != "$last" ]; then echo "  $kind $id: $status" >&2; last=$status; fi
    case $status in Success | Error | Canceled) printf '%s' "$run"; return ;; esac
    sleep 1
  done
}

say "Activating the policy plugins (WASI components) on the running server"
wasm=$repo/plugins/target/wasm32-wasip2/release
"$hangar" plugin push --slot retry-policy "$wasm/retry_exponential.wasm" --activate --actor demo
"$hangar" plugin push --slot cleanup-hook/detection "$wasm/detection_cleanup.wasm" --activate --actor demo
"$hangar" plugin list

device_hint=${HANGAR_DEVICE_HINT:-this machine}
say "Training RTMDet-tiny on it through hangar ($epochs epochs on $device_hint)"
training=$(api POST /v1/training-runs -d "{\"name\": \"demo training\", \"dataset_path\": \"$demo/dataset\", \"epochs\": $epochs, \"frozen_stages\": 0}")
training_id=$(json "d['id']" <<<"$training")
training=$(wait_run training-runs "$training_id")
if [ "$(json "d['status']" <<<"$training")" != Success ]; then
  echo "training failed: $(json "d['error_message']" <<<"$training")" >&2
  echo "logs: .hangar/logs/succ_$training_id.txt, .hangar/logs/error_$training_id.txt" >&2
  exit 1
fi
model_id=$(json "d['trained_model_id']" <<<"$training")
api GET "/v1/models/$model_id" | json "'  model ' + d['id'] + ': ' + d['name'] + ', classes ' + ', '.join(d['classes'])"

say "Detecting objects in the 1800x1500 scene (tiled: 1280 px patches, overlap 0.25, NMS merge)"
run=$(api POST /v1/detection-runs -d "{\"name\": \"demo detection\", \"image_path\": \"$demo/scene.png\", \"model_id\": \"$model_id\", \"score_threshold\": 0.3}")
run_id=$(json "d['id']" <<<"$run")
run=$(wait_run detection-runs "$run_id")
if [ "$(json "d['status']" <<<"$run")" != Success ]; then
  echo "detection failed: $(json "d['error_message']" <<<"$run")" >&2
  exit 1
fi

say "Detections of run $run_id"
# The run goes in through the environment: the program itself is Python's stdin.
RUN_JSON=$run "$python" - "$demo/scene.png.truth.json" <<'PY'
import json, os, sys
run = json.loads(os.environ["RUN_JSON"])
truth = json.load(open(sys.argv[1]))["objects"]

def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0

print(f"{'class':<12} {'score':>6}  box (x1, y1, x2, y2)            matches the truth")
found = 0
for d in run["detections"]:
    box = [d["x1"], d["y1"], d["x2"], d["y2"]]
    best = max(truth, key=lambda t: iou(box, t["bbox"]), default=None)
    ok = best is not None and iou(box, best["bbox"]) > 0.5 and best["class_name"] == d["class_name"]
    found += ok
    print(f"{d['class_name']:<12} {d['score']:6.2f}  ({box[0]:6.0f}, {box[1]:6.0f}, {box[2]:6.0f}, {box[3]:6.0f})  {'yes' if ok else 'no'}")
print(f"\n{found} of {len(truth)} synthetic objects found with their correct class")
sys.exit(0 if found == len(truth) else 3)
PY
echo
echo "stdout/stderr of the driver: .hangar/logs/succ_$run_id.txt, .hangar/logs/error_$run_id.txt"
echo "output folder:               .hangar/detections/$run_id/detection_bboxes.json"
echo "job details:                 $hangar job show $(json "d['job_id']" <<<"$run")"
echo "plugins:                     $hangar plugin list"
