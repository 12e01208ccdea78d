# bash completion for multihost; generated from its argparse parsers by
# 'multihost completion bash' (do not edit).
declare -A _multihost_subs=(
  ['multihost']='simulate whohas check-config agent status drain undrain cleanup backend-routes lab completion'
  ['multihost simulate']=''
  ['multihost whohas']=''
  ['multihost check-config']=''
  ['multihost agent']=''
  ['multihost status']=''
  ['multihost drain']=''
  ['multihost undrain']=''
  ['multihost cleanup']=''
  ['multihost backend-routes']=''
  ['multihost lab']='up down clean status set-live probe fail recover drain undrain chaos loss partition heal demo exec'
  ['multihost lab up']=''
  ['multihost lab down']=''
  ['multihost lab clean']=''
  ['multihost lab status']=''
  ['multihost lab set-live']=''
  ['multihost lab probe']=''
  ['multihost lab fail']=''
  ['multihost lab recover']=''
  ['multihost lab drain']=''
  ['multihost lab undrain']=''
  ['multihost lab chaos']=''
  ['multihost lab loss']=''
  ['multihost lab partition']=''
  ['multihost lab heal']=''
  ['multihost lab demo']=''
  ['multihost lab exec']=''
  ['multihost completion']=''
)
declare -A _multihost_opts=(
  ['multihost']='-h --help --version'
  ['multihost simulate']='-h --help --config --group --members --slots --weights --table --event --json'
  ['multihost whohas']='-h --help --config --group --members --slots --weights --table --live --seed --flow --proto --hash --socket --json'
  ['multihost check-config']='-h --help --no-key --json'
  ['multihost agent']='-h --help --config --node --manual --control-socket'
  ['multihost status']='-h --help --socket --config --json'
  ['multihost drain']='-h --help --socket --config --wait --timeout --json'
  ['multihost undrain']='-h --help --socket --config --json'
  ['multihost cleanup']='-h --help --config --node --control-socket --json'
  ['multihost backend-routes']='-h --help --config --backend --apply --remove --json'
  ['multihost lab']='-h --help'
  ['multihost lab up']='-h --help --prefix --nodes --clients --seed --switch --manual --heartbeat-ms --dead-after-ms --quorum --max-drain-ms --backend --ipv6 --transparent --return --proxy --routed --router-neigh --weights --table --json'
  ['multihost lab down']='-h --help --prefix --json'
  ['multihost lab clean']='-h --help --prefix --json'
  ['multihost lab status']='-h --help --prefix --json'
  ['multihost lab set-live']='-h --help --prefix --json'
  ['multihost lab probe']='-h --help --prefix --connections --udp --icmp --target --ipv6 --client --concurrency --timeout --rate --port-seed --sources --check --flows --json'
  ['multihost lab fail']='-h --help --prefix --how --json'
  ['multihost lab recover']='-h --help --prefix --json'
  ['multihost lab drain']='-h --help --prefix --json'
  ['multihost lab undrain']='-h --help --prefix --json'
  ['multihost lab chaos']='-h --help --prefix --duration --seed --nodes --streams --rate --keep --agent-nice --quorum --backend --ipv6 --json'
  ['multihost lab loss']='-h --help --prefix --node --json'
  ['multihost lab partition']='-h --help --prefix --json'
  ['multihost lab heal']='-h --help --prefix --json'
  ['multihost lab demo']='-h --help --prefix --connections --how --backend --ipv6 --json'
  ['multihost lab exec']='-h --help --prefix'
  ['multihost completion']='-h --help'
)
declare -A _multihost_takes=(
  ['multihost']=''
  ['multihost simulate']='--config --group --members --slots --weights --table --event'
  ['multihost whohas']='--config --group --members --slots --weights --table --live --seed --flow --proto --hash --socket'
  ['multihost check-config']=''
  ['multihost agent']='--config --node --control-socket'
  ['multihost status']='--socket --config'
  ['multihost drain']='--socket --config --timeout'
  ['multihost undrain']='--socket --config'
  ['multihost cleanup']='--config --node --control-socket'
  ['multihost backend-routes']='--config --backend'
  ['multihost lab']=''
  ['multihost lab up']='--prefix --nodes --clients --seed --switch --heartbeat-ms --dead-after-ms --max-drain-ms --backend --return --proxy --router-neigh --weights --table'
  ['multihost lab down']='--prefix'
  ['multihost lab clean']='--prefix'
  ['multihost lab status']='--prefix'
  ['multihost lab set-live']='--prefix'
  ['multihost lab probe']='--prefix --connections --target --client --concurrency --timeout --rate --port-seed --sources'
  ['multihost lab fail']='--prefix --how'
  ['multihost lab recover']='--prefix'
  ['multihost lab drain']='--prefix'
  ['multihost lab undrain']='--prefix'
  ['multihost lab chaos']='--prefix --duration --seed --nodes --streams --rate --agent-nice --backend'
  ['multihost lab loss']='--prefix --node'
  ['multihost lab partition']='--prefix'
  ['multihost lab heal']='--prefix'
  ['multihost lab demo']='--prefix --connections --how --backend'
  ['multihost lab exec']='--prefix'
  ['multihost completion']=''
)
declare -A _multihost_files=(
  ['multihost']=''
  ['multihost simulate']='--config'
  ['multihost whohas']='--config --socket'
  ['multihost check-config']=''
  ['multihost agent']='--config --control-socket'
  ['multihost status']='--socket --config'
  ['multihost drain']='--socket --config'
  ['multihost undrain']='--socket --config'
  ['multihost cleanup']='--config --control-socket'
  ['multihost backend-routes']='--config'
  ['multihost lab']=''
  ['multihost lab up']=''
  ['multihost lab down']=''
  ['multihost lab clean']=''
  ['multihost lab status']=''
  ['multihost lab set-live']=''
  ['multihost lab probe']=''
  ['multihost lab fail']=''
  ['multihost lab recover']=''
  ['multihost lab drain']=''
  ['multihost lab undrain']=''
  ['multihost lab chaos']=''
  ['multihost lab loss']=''
  ['multihost lab partition']=''
  ['multihost lab heal']=''
  ['multihost lab demo']=''
  ['multihost lab exec']=''
  ['multihost completion']=''
)
declare -A _multihost_choices=(
  ['multihost simulate --table']='factorial minimal'
  ['multihost whohas --table']='factorial minimal'
  ['multihost whohas --proto']='tcp udp sctp icmp icmpv6'
  ['multihost whohas --hash']='4-tuple 3-tuple source-ip source-ip-port destination-ip destination-ip-port'
  ['multihost lab up --switch']='snooping flood strict'
  ['multihost lab up --backend']='auto xdp nft'
  ['multihost lab up --return']='routes gateway'
  ['multihost lab up --proxy']='nginx haproxy'
  ['multihost lab up --router-neigh']='static arp'
  ['multihost lab up --table']='factorial minimal'
  ['multihost lab fail --how']='crash link'
  ['multihost lab chaos --backend']='auto xdp nft'
  ['multihost lab demo --how']='crash link'
  ['multihost lab demo --backend']='auto xdp nft'
  ['multihost completion -']='bash zsh'
)
declare -A _multihost_posfile=(
  ['multihost check-config']=1
)

_multihost() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" path=multihost w i skip=0
    [[ $COMP_CWORD -gt 0 ]] && prev="${COMP_WORDS[COMP_CWORD-1]}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        if [[ $skip -eq 1 ]]; then skip=0; continue; fi
        [[ $w == -- ]] && return 0
        if [[ $w == -* ]]; then
            [[ " ${_multihost_takes[$path]} " == *" $w "* ]] && skip=1
            continue
        fi
        if [[ " ${_multihost_subs[$path]} " == *" $w "* ]]; then
            path="$path $w"
        fi
    done
    if [[ $skip -eq 1 ]]; then
        local key="$path $prev"
        if [[ -n "${_multihost_choices[$key]+x}" ]]; then
            COMPREPLY=($(compgen -W "${_multihost_choices[$key]}" -- "$cur"))
        elif [[ " ${_multihost_files[$path]} " == *" $prev "* ]]; then
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_multihost_opts[$path]}" -- "$cur"))
    elif [[ -n "${_multihost_subs[$path]}" ]]; then
        COMPREPLY=($(compgen -W "${_multihost_subs[$path]}" -- "$cur"))
    elif [[ -n "${_multihost_choices[$path -]+x}" ]]; then
        COMPREPLY=($(compgen -W "${_multihost_choices[$path -]}" -- "$cur"))
    elif [[ -n "${_multihost_posfile[$path]+x}" ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
    return 0
}
complete -o filenames -o bashdefault -F _multihost multihost
