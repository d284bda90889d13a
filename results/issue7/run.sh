cd /work/wt/issue7
export PYTHONPATH=src
run() { /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KB" /work/main/.venv/bin/python -m ptqkit.cli bench --suite text-minilm --methods $1 --w-bits $2 --a-bits $3 --calib-size 512 --json /tmp/i7/runs/w$2a$3-$(echo $1 | tr , _).json; }
run mse 4 8
run mse 4 4
run percentile 4 8
run minmax 8 8
run minmax 4 8
