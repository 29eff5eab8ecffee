# kvm-harness Windows image: run once at first logon from the answer CD (autounattend.xml).
# Sets up what the harness needs and turns off what would perturb measurements; the list
# of what it turns off is recorded in the image manifest (SETTINGS_OFF in
# harness/image/windows_build.py). No secret is in this script or its log.
param([Parameter(Mandatory = $true)][string]$Media)
$ErrorActionPreference = 'Stop'
New-Item -ItemType Directory -Force C:\kvm-harness | Out-Null
Start-Transcript -Path C:\kvm-harness\setup.log

# The marker tool and the workload programs (cross-built with mingw-w64 by the build).
Copy-Item "$Media\tools\*.exe" C:\kvm-harness\

# WinRM over HTTPS only, with the certificate made at build time: the harness pins its
# SHA-256 (recorded in the image manifest), the analogue of the Linux guest's host key.
$cert = Import-PfxCertificate -FilePath "$Media\listener.pfx" -CertStoreLocation Cert:\LocalMachine\My
Enable-PSRemoting -SkipNetworkProfileCheck -Force
Get-ChildItem WSMan:\localhost\Listener | Where-Object { $_.Keys -contains 'Transport=HTTP' } |
    Remove-Item -Recurse -Force
New-Item -Path WSMan:\localhost\Listener -Transport HTTPS -Address * `
    -CertificateThumbPrint $cert.Thumbprint -Force | Out-Null
Set-Item WSMan:\localhost\Service\Auth\Basic $false
Set-Item WSMan:\localhost\Service\AllowUnencrypted $false
New-NetFirewallRule -Name kvm-harness-winrm-https -DisplayName 'kvm-harness WinRM HTTPS' `
    -Direction Inbound -Protocol TCP -LocalPort 5986 -Action Allow | Out-Null
# A local administrator over the network keeps its full token (NTLM, no UAC filtering).
Set-ItemProperty HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System `
    -Name LocalAccountTokenFilterPolicy -Value 1 -Type DWord

# Quiet for measurements: no updates, scans, prefetching, indexing or defrag behind a run.
Stop-Service wuauserv -Force; Set-Service wuauserv -StartupType Disabled          # windows-update
try { Set-MpPreference -DisableRealtimeMonitoring $true -ScanScheduleDay 8 `
        -DisableScanningMappedNetworkDrivesForFullScan $true }                    # defender
catch { Write-Output "defender: $_ (tamper protection?)" }
Stop-Service SysMain -Force; Set-Service SysMain -StartupType Disabled            # sysmain
Stop-Service WSearch -Force; Set-Service WSearch -StartupType Disabled            # search-indexer
Disable-ScheduledTask -TaskPath '\Microsoft\Windows\Defrag\' -TaskName ScheduledDefrag | Out-Null  # scheduled-defrag
powercfg /setactive 8c5e7fda-e8bf-4a96-9a85-a6e23a8c635c                # high-performance-power-plan

# No automatic logon after this one, and no cached answer file left on the disk.
$winlogon = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon'
Set-ItemProperty $winlogon -Name AutoAdminLogon -Value 0                     # autologon-after-setup
Remove-ItemProperty $winlogon -Name DefaultPassword -ErrorAction SilentlyContinue
Remove-Item C:\Windows\Panther\unattend.xml, C:\Windows\Panther\autounattend.xml `
    -Force -ErrorAction SilentlyContinue

Stop-Transcript
shutdown /s /t 10 /c "kvm-harness image build: installed"
